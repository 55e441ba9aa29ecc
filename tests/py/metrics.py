"""Scrapes an OpenMetrics endpoint and parses it with the reference parser (Debian's
python3-prometheus-client): prints {"name{label="v",...}": value} as JSON, or fails on text
that is not valid OpenMetrics."""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

req = urllib.request.Request(sys.argv[1])
with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
    assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers
    text = r.read().decode()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
