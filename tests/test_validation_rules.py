"""The shared rules one by one, with the edge cases Istio's and Kubernetes' own tests pin down."""

from __future__ import annotations

import pytest

from mizzen.services.mesh.validation import validate_object
from mizzen.services.mesh.validation.common import (
    Errs,
    check_export_to,
    fqdn_error,
    header_value_error,
    host_matches,
    host_subset_of,
    iana_port_name_errors,
    ip_subnet_error,
    k8s_endpoint_ip_errors,
    namespace_slash_host_errors,
    qualified_name_errors,
    regex_error,
    wildcard_domain_error,
)
from mizzen.services.mesh.validation.destinationrule import _is_prime, _localities_error
from mizzen.services.mesh.validation.schema import Duration, check


@pytest.mark.parametrize("host", [
    "reviews", "reviews.bookinfo.svc.cluster.local", "*", "*.example.com", "*-svc.example.com", "*svc.example.com",
    "istio.io.", "UPPER.example.com", "a" * 63 + ".com",
])
def test_wildcard_domains_accepted(host):
    assert wildcard_domain_error(host) is None


@pytest.mark.parametrize(("host", "message"), [
    ("", "empty domain name not allowed"),
    ("a" * 256, "too long (max 255)"),
    ("foo.*.com", 'label "*" invalid'),
    ("*.*.com", 'label "*" invalid'),
    ("a..b", 'label "" invalid'),
    ("foo.123", 'top level domain "123" cannot be all-numeric'),
    ("a" * 64 + ".com", "invalid (label"),
    ("-a.com", 'label "-a" invalid'),
    ("10.0.0.1", "cannot be all-numeric"),
])
def test_wildcard_domains_rejected(host, message):
    err = wildcard_domain_error(host)
    assert err is not None and message in err


def test_fqdn_rejects_wildcards():
    assert fqdn_error("api.example.com") is None
    assert 'label "*" invalid' in fqdn_error("*.example.com")


@pytest.mark.parametrize(("a", "b", "matches", "a_in_b"), [
    ("foo.com", "foo.com", True, True),
    ("*.foo.com", "bar.foo.com", True, False),
    ("bar.foo.com", "*.foo.com", True, True),
    ("*.foo.com", "*.com", True, True),
    ("*.com", "*.foo.com", True, False),
    ("*", "anything.com", True, False),
    ("foo.com", "bar.com", False, False),
])
def test_host_overlap_and_subset(a, b, matches, a_in_b):
    assert host_matches(a, b) is matches
    assert host_subset_of(a, b) is a_in_b


@pytest.mark.parametrize(("host", "gateway", "message"), [
    ("ns1/*.example.com", True, None),
    ("*/foo.example.com", True, None),
    ("./foo.example.com", True, None),
    ("foo.example.com", True, None),
    ("10.1.2.3", True, None),
    ("~/*.example.com", False, None),
    ("*/*", False, None),
    ("foo.example.com", False, "host must be of form namespace/dnsName"),
    ("/foo.example.com", False, "config namespace and dnsName in host entry cannot be empty"),
    ("ns1/foo", False, "short names (non FQDN) are not allowed"),
    ("Bad_NS/foo.example.com", False, 'invalid namespace value "Bad_NS" in sidecar'),
    ("ns1/*foo.example.com", False, 'partial wildcard "*foo.example.com" not allowed'),
])
def test_namespace_slash_hosts(host, gateway, message):
    errs = namespace_slash_host_errors(host, is_gateway=gateway)
    if message is None:
        assert errs == []
    else:
        assert any(message in e for e in errs), errs


@pytest.mark.parametrize(("text", "message"), [
    ("1h2m3.5s", None),
    ("300ms", None),
    ("1.5s", None),
    ("0.001s", None),
    ("1", "invalid duration '1'"),
    ("1.5", "invalid duration"),
    ("5 s", "invalid duration"),
    ("0s", "duration must be greater than 1ms"),
    ("-1s", "duration must be greater than 1ms"),
    ("999us", "duration must be greater than 1ms"),
    ("1001us", "only durations to ms precision are supported"),
    ("400000000000s", "out of range"),
])
def test_istio_durations(text, message):
    errs = check(text, Duration())
    if message is None:
        assert errs == []
    else:
        assert len(errs) == 1 and message in errs[0].message


def test_lenient_durations_allow_zero_but_not_negative():
    assert check("0s", Duration(strict=False)) == []
    assert check("1500us", Duration(strict=False)) == []
    assert check("-1s", Duration(strict=False))[0].message == "duration must not be negative"


def test_regex_length_limit_and_re2_syntax():
    assert regex_error("a" * 1024, "uri") is None
    assert regex_error("a" * 1025, "uri") == '"uri": regex is too large, max length allowed is 1024'
    assert regex_error(r"^/api/(v1|v2)/\d+$", "uri") is None
    assert "invalid escape sequence" in regex_error(r"\8", "uri")  # RE2 has no backreferences
    assert "missing ]" in regex_error("[a-", "uri")


@pytest.mark.parametrize(("value", "ok"), [
    ("plain", True),
    ("%HOSTNAME%", True),
    ("prefix %START_TIME% suffix", True),
    ("100%%", True),
    ("%REQ(x-foo)%", True),
    ('%UPSTREAM_METADATA(["ns", "key"])%', True),
    ("%", False),
    ("abc%123", False),
    ("%START_TIME%%", False),
    ('%UPSTREAM_METADATA(["ns" "key"])%', False),
    ("line\nbreak", False),
])
def test_header_values(value, ok):
    assert (header_value_error(value) is None) is ok


def test_export_to_rules():
    def run(entries, service_entry=False, selector=False):
        errs = Errs()
        check_export_to(entries, "default", "spec.exportTo", errs, service_entry, selector)
        return [(e.path, e.message) for e in errs.items]

    assert run([".", "istio-system"]) == []
    assert run(["*"]) == []
    assert run(["default", "."]) == [("spec.exportTo[1]", "duplicate entries in exportTo: . and current namespace default")]
    assert run([".", "default"]) == [("spec.exportTo[1]", "duplicate entries in exportTo for entry default")]
    assert run(["Bad_NS"]) == [("spec.exportTo[0]", "only .,*, or a valid DNS 1123 label is allowed as exportTo entry")]
    assert run(["~"], service_entry=True) == []
    assert run(["default"], selector=True) == []
    assert run([".", "other"], selector=True) == [
        ("spec.exportTo", "destination rule with workload selector cannot have multiple entries in exportTo")]


def test_kubernetes_names_and_ports():
    assert qualified_name_errors("app.kubernetes.io/name") == []
    assert qualified_name_errors("a/b/c")
    assert qualified_name_errors("Example.COM/x") == ["prefix part a lowercase RFC 1123 subdomain must consist of lower "
                                                     "case alphanumeric characters, '-' or '.', and must start and end "
                                                     "with an alphanumeric character (e.g. 'example.com')"]
    assert iana_port_name_errors("http-web") == []
    assert iana_port_name_errors("http--web") == ["must not contain consecutive hyphens"]
    assert "must not begin or end with a hyphen" in iana_port_name_errors("-web")


@pytest.mark.parametrize(("ip", "ok"), [
    ("10.200.0.135", True), ("127.0.0.1", True), ("::1", True), ("2001:db8::1", True),
    ("0.0.0.0", False), ("::", False), ("169.254.1.1", False), ("fe80::1", False), ("224.0.0.5", False),
    ("10.0.0.01", False), ("10.0.0", False),
])
def test_endpoint_addresses(ip, ok):
    assert (k8s_endpoint_ip_errors(ip) == []) is ok


def test_ip_subnets():
    assert ip_subnet_error("10.0.0.0/8") is None
    assert ip_subnet_error("2001:db8::/32") is None
    assert ip_subnet_error("10.0.0.1") is None
    assert ip_subnet_error("10.0.0.0/8/8") == "10.0.0.0/8/8 is not a valid IP"
    assert ip_subnet_error("10.0.0.0/40") == "10.0.0.0/40 is not a valid CIDR block"


def test_maglev_prime_and_localities():
    assert [n for n in range(20) if _is_prime(n)] == [1, 2, 3, 5, 7, 11, 13, 17, 19]
    assert _is_prime(65537) and not _is_prime(65535)
    assert _localities_error(["us-west", "us-east/zone1", "us-east/zone2/a"]) is None
    assert _localities_error(["us-west/*", "us-west/zone1"]) == "locality us-west/zone1 overlap with previous specified ones"
    assert _localities_error(["*", "us-east"]) == "locality us-east overlap with previous specified ones"
    assert _localities_error(["us-west//a"]) == "locality us-west//a must not contain empty region/zone/subzone info"


def _vs(http: list) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "default"}, "spec": {"hosts": ["r"], "http": http}}


def test_weights_follow_istio_1_7():
    single = _vs([{"route": [{"destination": {"host": "r"}, "weight": 30}]}])
    assert validate_object(single) == [], "a single destination may carry any weight"
    split = _vs([{"route": [{"destination": {"host": "r", "subset": s}, "weight": w}
                            for s, w in (("a", 33), ("b", 33), ("c", 34))]}])
    assert validate_object(split) == []
    relative = _vs([{"route": [{"destination": {"host": "r", "subset": s}, "weight": 1} for s in ("a", "b")]}])
    assert [(e.path, e.message) for e in validate_object(relative)] == [
        ("spec.http[0].route", "total destination weight 2 != 100")]


def test_retry_on_accepts_status_codes_and_envoy_policies():
    ok = _vs([{"retries": {"attempts": 2, "retryOn": "gateway-error,503,retriable-4xx,cancelled"},
               "route": [{"destination": {"host": "r"}}]}])
    assert validate_object(ok) == []
    bad = _vs([{"retries": {"attempts": 2, "retryOn": "5xx, reset,999"}, "route": [{"destination": {"host": "r"}}]}])
    assert [e.message for e in validate_object(bad)] == [
        '" reset" is not a valid retryOn policy', '"999" is not a valid retryOn policy']


def test_redirect_prefix_rewrite_needs_prefix_matches():
    bad = _vs([{"match": [{"uri": {"exact": "/a"}}], "redirect": {"prefixRewrite": "/b"}}])
    assert [(e.path, e.message) for e in validate_object(bad)] == [
        ("spec.http[0].redirect.prefixRewrite", "redirect prefix_rewrite requires all URI matches to use prefix match type")]


def test_structural_errors_come_alone():
    """Like the API server, semantic rules only run on a structurally sound object."""
    obj = _vs([{"route": [{"destination": {"host": "*"}, "wieght": 10}]}])
    assert [(e.path, e.message) for e in validate_object(obj)] == [
        ("spec.http[0].route[0].wieght", 'unknown field "wieght" (did you mean "weight"?)')]
