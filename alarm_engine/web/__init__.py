"""The operator's window: a live web page and a JSON API (`alarm-engine web`)."""
