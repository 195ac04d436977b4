"""The operator's web page (Flask app factory in ``web.app``)."""
