"""Files shipped inside the package: the example config and the systemd units. In the repository they are
symlinks to ``pkcs11_config/``, their one source; the wheel carries copies (``dfns-agent files``)."""
