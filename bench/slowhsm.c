/*
 * A PKCS#11 filter module for the benchmark: it forwards every call to the module named by
 * SLOWHSM_MODULE (SoftHSM) and sleeps SLOWHSM_SIGN_US microseconds in each C_Sign that produces a
 * signature, the way a network HSM or a slow device holds a signing session for a fixed time while the
 * host's CPU stays idle. Built by bench/slowhsm.py; never part of the agent.
 *
 * Only C_Sign is changed. The length query (pSignature == NULL) returns at once, as on real devices,
 * which answer it from the key size. Sleeps in different sessions overlap, so the module's concurrency
 * limit is sessions / latency, which is what the benchmark compares the agent against.
 *
 * SLOWHSM_MAX_SESSIONS (tests) caps the sessions open in the process: one more C_OpenSession returns
 * CKR_SESSION_COUNT, as ykcs11 does past 16 and a YubiHSM 2 past its 16 device sessions.
 * SLOWHSM_CANT_LOCK=1 (tests) answers C_Initialize with CKF_OS_LOCKING_OK by CKR_CANT_LOCK, as a module
 * built without thread support does; C_Initialize without it goes through.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST slow_list;
static CK_FUNCTION_LIST_PTR inner;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static long sign_us;
static long max_sessions;  /* 0: no cap */
static int cant_lock;
static long open_sessions;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static CK_RV slow_sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                       CK_ULONG_PTR signature_len) {
    if (signature != NULL && sign_us > 0) {
        struct timespec ts = {sign_us / 1000000, (sign_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    return inner->C_Sign(session, data, data_len, signature, signature_len);
}

static CK_RV capped_open(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                         CK_SESSION_HANDLE_PTR session) {
    pthread_mutex_lock(&count_lock);
    CK_RV rv = CKR_SESSION_COUNT;
    if (open_sessions < max_sessions) {
        rv = inner->C_OpenSession(slot, flags, app, notify, session);
        if (rv == CKR_OK) {
            open_sessions++;
        }
    }
    pthread_mutex_unlock(&count_lock);
    return rv;
}

/* The count after a call that closed sessions, if it succeeded: one fewer, or (all) none left. */
static CK_RV count_closed(CK_RV rv, int all) {
    if (rv == CKR_OK) {
        pthread_mutex_lock(&count_lock);
        open_sessions = all ? 0 : open_sessions - 1;
        pthread_mutex_unlock(&count_lock);
    }
    return rv;
}

static CK_RV capped_close(CK_SESSION_HANDLE session) { return count_closed(inner->C_CloseSession(session), 0); }

static CK_RV capped_close_all(CK_SLOT_ID slot) { return count_closed(inner->C_CloseAllSessions(slot), 1); }

static CK_RV capped_finalize(CK_VOID_PTR reserved) { return count_closed(inner->C_Finalize(reserved), 1); }

static CK_RV picky_initialize(CK_VOID_PTR args) {
    if (args != NULL && (((CK_C_INITIALIZE_ARGS *)args)->flags & CKF_OS_LOCKING_OK)) {
        return CKR_CANT_LOCK;
    }
    return inner->C_Initialize(args);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static void load(void) {
    const char *path = getenv("SLOWHSM_MODULE");
    const char *us = getenv("SLOWHSM_SIGN_US");
    const char *cap = getenv("SLOWHSM_MAX_SESSIONS");
    const char *nolock = getenv("SLOWHSM_CANT_LOCK");
    if (path == NULL || path[0] == '\0') {
        return;
    }
    sign_us = us != NULL ? strtol(us, NULL, 10) : 0;
    max_sessions = cap != NULL ? strtol(cap, NULL, 10) : 0;
    cant_lock = nolock != NULL && strcmp(nolock, "1") == 0;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get == NULL || get(&inner) != CKR_OK || inner == NULL) {
        return;
    }
    memcpy(&slow_list, inner, sizeof slow_list);
    slow_list.C_GetFunctionList = C_GetFunctionList;
    slow_list.C_Sign = slow_sign;
    if (cant_lock) {
        slow_list.C_Initialize = picky_initialize;
    }
    if (max_sessions > 0) {
        slow_list.C_OpenSession = capped_open;
        slow_list.C_CloseSession = capped_close;
        slow_list.C_CloseAllSessions = capped_close_all;
        slow_list.C_Finalize = capped_finalize;
    }
    load_rv = CKR_OK;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    if (list == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    pthread_once(&once, load);
    if (load_rv != CKR_OK) {
        return load_rv;
    }
    *list = &slow_list;
    return CKR_OK;
}
