"""Prints the chart rendered by Helm's library, as `helm template RELEASE -n NAMESPACE` would,
for the end-to-end suite (tests/cluster.rs), which installs its RBAC on a real API server.

    .venv/bin/python tests/chart/render_chart.py RELEASE NAMESPACE [VALUES_JSON]
"""

from __future__ import annotations

import json
import sys

from support import chart


def main() -> None:
    release, namespace = sys.argv[1], sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    manifests = chart().render(values, name=release, namespace=namespace, is_install=True)
    for path, text in sorted(manifests.items()):
        if not path.endswith("NOTES.txt"):
            print(f"---\n# Source: {path}\n{text}")


if __name__ == "__main__":
    main()
