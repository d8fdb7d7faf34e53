"""Imported first by the command-line tools, so that gRPC's C core stays off their console.

At its default level the C core writes lines such as "Handshake failed with error
SSL_ERROR_SSL ..." to stderr for failures the tools report in their own words. It
reads ``GRPC_VERBOSITY`` once, when grpc is first imported; a value the user set wins
(``GRPC_VERBOSITY=DEBUG`` shows everything).
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
