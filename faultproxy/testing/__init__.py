"""Test helpers: a real SSE origin (:mod:`.origin`), a real proxy process (:mod:`.proxy`), a pytest plugin.

Deliberately no re-exports: the pytest plugin imports this package in every pytest run of an environment
where faultproxy is installed, so importing it must stay free of asyncio, subprocess and friends.
"""
