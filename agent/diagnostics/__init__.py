"""``dfns-agent doctor``'s checks, as data: ``agent/diagnostics/doctor.py`` runs them in order and yields a
:class:`~agent.diagnostics.results.Check` for each; the CLI renders them."""
