"""Model builders for demos and tests (e.g. the tiny support model in ``tiny``)."""
