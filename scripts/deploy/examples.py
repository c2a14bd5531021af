#!/usr/bin/env python3
"""Static checks of the deployment and client example files (scripts/test-deploy).

  examples.py check FILE...   parse each file in its own format (JSON, TOML,
                              YAML) and check what a client needs from it
  examples.py configs OUTDIR  write every CONFIG embedded in the deployment
                              files to OUTDIR/<name>.json (for check-config)

Needs python3 >= 3.11 (tomllib) and PyYAML (Debian: python3-yaml).
"""

import json
import os
import sys
import tomllib

import yaml

CACHE = "127.0.0.1:5000"


class Bad(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Bad(msg)


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    if name.endswith(".json"):
        return "JSON", json.loads(data)
    if name.endswith(".toml") or name.endswith(".conf"):
        return "TOML", tomllib.loads(data.decode())
    if name.endswith(".yaml") or name.endswith(".yml"):
        return "YAML", [d for d in yaml.safe_load_all(data) if d is not None]
    raise Bad(f"unknown format: {name}")


def check_daemon_json(doc):
    mirrors = doc.get("registry-mirrors", [])
    need(mirrors and all(m.startswith("http://") for m in mirrors),
         "registry-mirrors: http:// URLs expected (regcache speaks plain HTTP)")
    # dockerd refuses a mirror URL with a path.
    need(all(m.rstrip("/").count("/") == 2 for m in mirrors), "registry-mirrors: no path allowed")
    insecure = doc.get("insecure-registries", [])
    for m in mirrors:
        need(m.split("//", 1)[1].rstrip("/") in insecure, f"{m} is not in insecure-registries")


def check_hosts_toml(doc, path):
    hosts = doc.get("host", {})
    need(hosts, "no [host.\"...\"] entry")
    for url, h in hosts.items():
        need(url.startswith("http://") or url.startswith("https://"), f"host {url}: scheme needed")
        caps = h.get("capabilities", [])
        need("pull" in caps and "resolve" in caps, f"host {url}: capabilities pull and resolve needed")
        need(not h.get("override_path"), f"host {url}: override_path would drop /v2")
    server = doc.get("server")
    if "_default" in path:
        need(server is None, "_default: leave server unset (the registry itself)")
    else:
        need(server and server.startswith("https://"), "server (the real registry) expected")


def check_registries_conf(doc):
    regs = doc.get("registry", [])
    need(regs, "no [[registry]]")
    need(doc.get("short-name-mode") != "enforcing" or doc.get("unqualified-search-registries"),
         "short names cannot resolve")
    seen = set()
    for r in regs:
        key = r.get("prefix") or r.get("location")
        need(key, "[[registry]] needs prefix or location")
        need(key not in seen, f"{key}: duplicate [[registry]]")
        seen.add(key)
        for m in r.get("mirror", []):
            # containers/image does not apply the registry's insecure flag to mirrors.
            need(m.get("insecure") is True, f"{key}: mirror {m.get('location')} needs insecure = true")
            loc = m.get("location", "")
            need(loc.startswith(CACHE), f"{key}: mirror {loc} is not the cache")
            prefix = loc[len(CACHE):].strip("/")
            if prefix:
                need(key.split(":")[0].startswith(prefix) or prefix in key,
                     f"{key}: mirror path prefix {prefix} does not name the registry")


def check_k3s(doc):
    need(len(doc) == 1, "one YAML document expected")
    mirrors = doc[0].get("mirrors", {})
    need("docker.io" in mirrors, "docker.io mirror expected")
    for name, m in mirrors.items():
        eps = m.get("endpoint", [])
        need(eps and all(e.startswith("http://") for e in eps), f"{name}: http:// endpoints expected")


def check_kubernetes(docs):
    kinds = {d["kind"]: d for d in docs}
    for k in ("Namespace", "ConfigMap", "Secret", "DaemonSet", "Service"):
        need(k in kinds, f"no {k}")
    for d in docs:
        need(d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{d.get('kind')}: apiVersion/name")
    ds = kinds["DaemonSet"]
    spec = ds["spec"]
    labels = spec["template"]["metadata"]["labels"]
    need(all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()),
         "DaemonSet selector does not match its pod labels")
    svc = kinds["Service"]
    need(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
         "Service selector does not match the DaemonSet's pods")
    pod = spec["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "regcache")
    port = next(p for p in c["ports"] if p["name"] == "http")
    need(port["containerPort"] == 5000 and port.get("hostPort") == 5000, "port 5000 on the node expected")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    need(set(mounts) <= set(volumes), "a volumeMount names no volume")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    cm = kinds["ConfigMap"]
    cfg_file = env.get("CONFIG_FILE", "")
    cfg_mount = next(n for n, p in mounts.items() if cfg_file.startswith(p + "/"))
    need(volumes[cfg_mount]["configMap"]["name"] == cm["metadata"]["name"], "CONFIG_FILE is not the ConfigMap")
    config = json.loads(cm["data"][os.path.basename(cfg_file)])
    secret = kinds["Secret"]
    secret_mount = next(p for n, p in mounts.items() if "secret" in volumes[n])
    for item in config:
        for var, val in (item.get("variables", {}) if isinstance(item, dict) else {}).items():
            if var.endswith("_FILE"):
                need(val.startswith(secret_mount + "/") and
                     os.path.basename(val) in secret.get("stringData", secret.get("data", {})),
                     f"{var}={val} is not a key of the mounted Secret")
    need(pod.get("hostNetwork") is True, "hostNetwork expected (containerd uses 127.0.0.1:5000)")


def check_prometheus_rules(doc):
    """The promtool check is in tests/status.rs; here only the shape, so a stray file fails."""
    groups = doc[0].get("groups") if doc and isinstance(doc[0], dict) else None
    need(isinstance(groups, list) and groups, "Prometheus rule file without groups")
    for g in groups:
        need(g.get("name") and g.get("rules"), f"group {g!r}: name and rules expected")
        for r in g["rules"]:
            need(("alert" in r or "record" in r) and "expr" in r, f"rule {r!r}: alert/record and expr expected")


def check_grafana(doc):
    panels = doc.get("panels") if isinstance(doc, dict) else None
    need(isinstance(panels, list) and panels, "Grafana dashboard without panels")
    for panel in panels:
        if panel.get("type") != "row":
            need(panel.get("targets"), f"panel {panel.get('title')!r} has no queries")


def check_config(doc):
    need(isinstance(doc, list) and doc, "CONFIG is a non-empty JSON array")
    for item in doc:
        need(isinstance(item, (str, dict)), f"item {item!r}: string or object")
        if isinstance(item, dict):
            need("registry" in item, f"item {item!r}: registry missing")


def check(path):
    fmt, doc = load(path)
    p = path.replace(os.sep, "/")
    if p.endswith("docker/daemon.json"):
        check_daemon_json(doc)
    elif p.endswith("/hosts.toml"):
        check_hosts_toml(doc, p)
    elif p.endswith("registries.conf"):
        check_registries_conf(doc)
    elif p.endswith("k3s/registries.yaml"):
        check_k3s(doc)
    elif "/kubernetes/" in p:
        check_kubernetes(doc)
    elif "/grafana/" in p:
        check_grafana(doc)
    elif "/prometheus/" in p:
        check_prometheus_rules(doc)
    elif "/config/" in p and p.endswith(".json"):
        check_config(doc)
    elif p.endswith(".yml") or p.endswith(".yaml"):
        need(doc and "services" in doc[0], "compose/stack file without services")
    return fmt


def configs(root, out):
    os.makedirs(out, exist_ok=True)
    found = {}
    for name in ("docker-compose.yml", "stack.yml"):
        with open(os.path.join(root, name)) as f:
            doc = yaml.safe_load(f)
        found[name] = doc["services"]["regcache"]["environment"]["CONFIG"]
    with open(os.path.join(root, "examples/kubernetes/regcache.yaml")) as f:
        for d in yaml.safe_load_all(f):
            if d and d.get("kind") == "ConfigMap":
                found["kubernetes-configmap"] = d["data"]["config.json"]
    for name, text in found.items():
        json.loads(text)
        with open(os.path.join(out, name.replace(".yml", "") + ".json"), "w") as f:
            f.write(text)
        print(f"{name}: CONFIG written")


def main(argv):
    if len(argv) >= 2 and argv[0] == "check":
        bad = 0
        for path in argv[1:]:
            try:
                fmt = check(path)
                print(f"ok {path} ({fmt})")
            except (Bad, ValueError, KeyError, StopIteration, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
                print(f"FAIL {path}: {type(e).__name__}: {e}")
                bad += 1
        sys.exit(1 if bad else 0)
    elif len(argv) == 3 and argv[0] == "configs":
        configs(argv[1], argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
