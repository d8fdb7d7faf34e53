"""The web console: server-rendered pages inside the custodian process (``custodian serve --console``).

The pages call the same layer the admin API calls (``custodian.deployments``,
``custodian.roster``, the model store, the ledger's audit log); nothing here
keeps a second copy of the ledger logic. ``sessions`` holds the one-time login
links and the sessions they open, ``login_socket`` mints links for
``custodian console login`` over ``DATA/console.sock``, ``app`` builds the
Starlette application, ``listener`` runs it with uvicorn on the custodian's
event loop.
"""
