"""The Argo CD health checks of config/argocd: the argocd-cm snippet carries the .lua files
verbatim, and the scripts give the expected health for every branch (run with lua5.4)."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from support import ROOT

ARGOCD = ROOT / "config" / "argocd"


def test_argocd_cm_snippet_carries_the_lua_scripts_verbatim():
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    for kind, script in [("ReverseSync", "health-reversesync.lua"), ("Destination", "health-destination.lua")]:
        key = f"resource.customizations.health.backflow.dev_{kind}"
        assert cm["data"][key] == (ARGOCD / script).read_text(), f"{key} differs from {script}"


def test_health_scripts_map_conditions_to_argocd_health():
    lua = shutil.which("lua5.4")
    assert lua, "lua5.4 is not installed: `apt-get install lua5.4` (.ci/run does it)"
    result = subprocess.run([lua, str(ROOT / "tests" / "chart" / "argocd_health_test.lua"), str(ARGOCD)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"Lua health check cases failed:\n{result.stdout}{result.stderr}"
    assert " 0 failed" in result.stdout
