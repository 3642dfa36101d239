"""`mizzen iptables` applied for real in fresh network namespaces: the kernel's tables, read back with
iptables-save, equal the --dry-run text; `iptables -L -n -v` shows the seed's listing; --cleanup leaves
nothing behind."""

from __future__ import annotations

import os
import re
import sys

import pytest

from mizzen.services.sidecar import iptables as ipt
from mizzen.services.sidecar.netns import REPO_ROOT, PodNetwork, unavailable_reason
from tests.conftest import is_root
from tests.test_iptables_rules import CASES, SEED_ARGV, SEED_LISTING, SEED_SAVE

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not is_root(), reason="needs root: creates network namespaces and applies iptables rules"),
    pytest.mark.skipif(is_root() and unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ISTIO_ENV = {e for _s, _l, e, _d in ipt.FLAGS} | {"ENVOY_USER", "ISTIO_META_DNS_CAPTURE", "DRY_RUN"}


@pytest.fixture
def pod(tmp_path):
    with PodNetwork(keep_dir=tmp_path) as net:
        yield net.add_pod("ipt")


def mizzen_iptables(pod, argv: list[str], env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ISTIO_ENV}
    clean.update(env or {}, PYTHONPATH=str(REPO_ROOT))
    res = pod.run([sys.executable, "-m", "mizzen.services.cli.main", "iptables", *argv], env=clean, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def without_comments(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def listing_rows(text: str) -> list[str]:
    """`iptables -t nat -L -n -v` rows in the seed's vocabulary, counters dropped."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.split()[0] == "pkts":
            continue
        if line.startswith("Chain "):
            rows.append(re.sub(r"\(policy (\w+)[^)]*\)", r"(policy \1)", line.strip()))
            continue
        cols = line.split()[2:]
        cols[1] = {"0": "all", "6": "tcp", "17": "udp"}.get(cols[1], cols[1])
        cols = ["any" if c == "*" else "anywhere" if c == "0.0.0.0/0" else c for c in cols]
        rows.append(" ".join(cols).replace("dpt:22", "dpt:ssh"))
    return rows


def test_seed_rules_in_a_real_namespace(pod):
    mizzen_iptables(pod, SEED_ARGV)
    assert ipt.normalize_save(pod.iptables_save()) == SEED_SAVE
    listing = pod.run(["iptables", "-t", "nat", "-L", "-n", "-v"]).stdout
    assert listing_rows(listing) == listing_rows(SEED_LISTING)  # reference counts included

    mizzen_iptables(pod, [*SEED_ARGV, "--cleanup"])
    after = pod.iptables_save()
    assert "ISTIO_" not in after
    assert not re.search(r"^-A ", after, re.M), after


@pytest.mark.parametrize("name", list(CASES))
def test_flag_combination_applied_equals_dry_run(name, pod):
    argv, env, expected = CASES[name]
    assert mizzen_iptables(pod, [*argv, "--dry-run"], env) == expected
    mizzen_iptables(pod, argv, env)
    assert ipt.normalize_save(pod.iptables_save()) == without_comments(expected)
    if "-m TPROXY" in " ".join(argv) or env.get("ISTIO_INBOUND_INTERCEPTION_MODE") == "TPROXY":
        assert "fwmark 0x539 lookup 133" in pod.run(["ip", "-f", "inet", "rule", "show"]).stdout
        assert "local default dev lo" in pod.run(["ip", "-f", "inet", "route", "show", "table", "133"]).stdout

    mizzen_iptables(pod, [*argv, "--cleanup"], env)
    after = pod.iptables_save()
    assert "ISTIO_" not in after
    assert not re.search(r"^-A ", after, re.M), after  # the DNS, KubeVirt and TPROXY mark rules went too
    assert "lookup 133" not in pod.run(["ip", "-f", "inet", "rule", "show"]).stdout
    assert pod.run(["ip", "-f", "inet", "route", "show", "table", "133"], check=False).stdout.strip() == ""


def test_applying_twice_replaces_and_cleanup_spares_foreign_rules(pod):
    pod.run(["iptables-restore", "--noflush"], input=(
        "*nat\n:KEEP_ME - [0:0]\n-A KEEP_ME -j RETURN\n-A OUTPUT -d 10.9.9.9/32 -j KEEP_ME\nCOMMIT\n"))
    mizzen_iptables(pod, SEED_ARGV)
    mizzen_iptables(pod, SEED_ARGV)
    saved = ipt.normalize_save(pod.iptables_save())
    assert saved.count("-A PREROUTING -p tcp -j ISTIO_INBOUND\n") == 1
    assert saved.count("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n") == 1
    assert saved.count("-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN\n") == 1

    plan = mizzen_iptables(pod, [*SEED_ARGV, "--cleanup", "--dry-run"])
    assert "-D OUTPUT -p tcp -j ISTIO_OUTPUT" in plan and "-X ISTIO_OUTPUT" in plan
    assert "ISTIO_" in pod.iptables_save()  # the dry run changed nothing

    mizzen_iptables(pod, [*SEED_ARGV, "--cleanup"])
    after = ipt.normalize_save(pod.iptables_save())
    assert "ISTIO_" not in after
    assert "-A OUTPUT -d 10.9.9.9/32 -j KEEP_ME\n" in after and "-A KEEP_ME -j RETURN\n" in after


def test_cleanup_without_rules_is_a_no_op(pod):
    before = pod.iptables_save()
    mizzen_iptables(pod, ["--cleanup"])
    assert pod.iptables_save() == before
