"""Integration fixtures, defined once here so that session fixtures really are
one per session (a fixture imported into two test modules would be two).

Importing ioc.py first sets the CA client environment before anything loads pyepics.
"""

from tests.integration.ioc import demo_ioc, running_ioc  # noqa: F401
