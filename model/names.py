"""Names a user chooses from that live beside torch code, importable without torch.

The CLI builds its parser from these in every install (the serving install has no torch);
the modules that implement them import them from here.
"""

from __future__ import annotations

NETWORKS = ("mlp", "dcn")
