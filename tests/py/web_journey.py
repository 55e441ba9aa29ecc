#!/usr/bin/python3
"""Drives the web console in Debian's headless Chromium (Selenium + chromedriver, nothing
downloaded), as a person would: every step by label and button, a screenshot of each page.

  web_journey.py journey URL TOKEN SHOTS -- AGENT COMMAND...
      sign in, create a network, create a join token, start AGENT COMMAND with the join string
      appended, see its peer appear without a reload, remove it, see both in the audit log.
  web_journey.py readonly URL TOKEN SHOTS NETWORK
      a read-scope token sees no write controls; a write it forges anyway is refused.
  web_journey.py isolation URL TOKEN SHOTS PATH...
      each PATH (another tenant's objects) is not found for this tenant, GET and POST.

Prints one JSON object of measurements; any failed check exits non-zero with its reason.
"""
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select


def browser(width=1200):
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    # A profile of its own: two browsers sharing one (tests run in parallel) would be one
    # Chromium, the second's pages opening in the first's lab.
    profile = tempfile.mkdtemp(prefix="canopy-web-")
    atexit.register(shutil.rmtree, profile, True)
    o.add_argument(f"--user-data-dir={profile}")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              # The controller's own CA signs its certificate; the browser is not told of it.
              "--ignore-certificate-errors", f"--window-size={width},900"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.set_page_load_timeout(20)
    return d


def check(ok, why):
    if not ok:
        raise SystemExit(f"FAILED: {why}")


def field(d, label):
    """The input a <label> names (accessible by label, as a screen reader finds it)."""
    lab = d.find_element(By.XPATH, f"//label[normalize-space()='{label}']")
    return d.find_element(By.ID, lab.get_attribute("for"))


def press(d, text):
    d.find_element(By.XPATH, f"//button[normalize-space()='{text}']").click()


def shot(d, shots, name):
    d.save_screenshot(f"{shots}/{name}.png")


def sign_in(d, url, token, shots, name):
    # The web listener may be a moment behind the gRPC one the test waited for: until the page
    # is there, load it again (a browser's error page has no such label).
    def loaded():
        d.get(url + "/signin")
        return d.find_elements(By.XPATH, "//label[normalize-space()='API token']")

    wait_for(d, "the sign-in page", loaded, 10)
    field(d, "API token").send_keys(token)
    shot(d, shots, name)
    field(d, "API token").send_keys(Keys.ENTER)
    wait_for(d, "signed in", lambda: d.current_url.endswith("/networks"), 10)


def wait_for(d, what, pred, within):
    t = time.monotonic()
    while time.monotonic() - t < within:
        try:
            if pred():
                return time.monotonic() - t
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        except WebDriverException as e:
            # The live table replaced a row while it was read: Chrome says so in its own
            # words rather than as a stale element.
            if "does not belong to the document" not in str(e):
                raise
        time.sleep(0.05)
    raise SystemExit(f"FAILED: {what} within {within} s\n{d.page_source[:3000]}")


def peer_rows(d):
    return [r.text for r in d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")]


def journey(url, token, shots, agent):
    d = browser()
    out = {}
    sign_in(d, url, token, shots, "01-signin")
    shot(d, shots, "02-networks-empty")
    field(d, "Name").send_keys("webnet")
    field(d, "CIDRs (one IPv4 and/or one IPv6, comma-separated)").send_keys("100.64.77.0/24")
    press(d, "Create network")
    wait_for(d, "the network's page", lambda: d.current_url.endswith("/networks/webnet"), 10)
    shot(d, shots, "03-network")
    field(d, "Uses (0: unlimited)").clear()
    field(d, "Uses (0: unlimited)").send_keys("1")
    press(d, "Create join token")
    wait_for(d, "the join string", lambda: d.find_elements(By.ID, "join"), 10)
    join = d.find_element(By.ID, "join").text.strip()
    check(join.startswith("canopy1:"), f"a join string: {join!r}")
    check("canopy-agent join " + join in d.find_element(By.ID, "cmd").text, "the join command")
    shot(d, shots, "04-join-token")
    d.get(url + "/networks/webnet")
    check(not any("node1" in r for r in peer_rows(d)), "no peer yet")
    started = time.monotonic()
    agent = subprocess.Popen(agent + [join], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The page is not reloaded: the row arrives by the live update.
        d.execute_script("window.__canopy_marker = 1")
        wait_for(d, "the new peer on the page", lambda: any("node1" in r for r in peer_rows(d)), 15)
        out["peer_appeared_after_agent_start_s"] = round(time.monotonic() - started, 3)
        check(d.execute_script("return window.__canopy_marker") == 1, "the page was not reloaded")
        shot(d, shots, "05-peer-joined")
        heads = [h.text for h in d.find_elements(By.CSS_SELECTOR, "#peers thead th")]
        for h in ("DNS name", "Status", "Revision", "Last handshake", "Paths"):
            check(h in heads, f"the peers table shows {h}: {heads}")
        row = next(r for r in peer_rows(d) if "node1" in r)
        check("node1.webnet.canopy" in row and "online" in row, f"node1's row: {row}")
        out.update(policy(d, shots))
        d.get(url + "/networks/webnet")
        wait_for(d, "the peer listed", lambda: any("node1" in r for r in peer_rows(d)), 5)
        d.find_element(By.XPATH, "//button[@aria-label='Remove peer node1']").click()
        wait_for(d, "the peer gone after Remove", lambda: not any("node1" in r for r in peer_rows(d)), 5)
        shot(d, shots, "06-peer-removed")
    finally:
        agent.terminate()
    d.get(url + "/audit")
    actions = [c.text for c in d.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")]
    for a in ("token.create", "peer.remove", "network.create", "web.signin", "policy.update"):
        check(a in actions, f"{a} in the audit log: {actions}")
    field(d, "Action starts with").send_keys("peer.")
    press(d, "Filter")
    wait_for(d, "the filtered log", lambda: "action=peer." in d.current_url, 10)
    actions = [c.text for c in d.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")]
    check(actions == ["peer.remove", "peer.enroll"], f"the join and the removal: {actions}")
    shot(d, shots, "07-audit")
    # A read-scope API token made on the API tokens page (shown once).
    d.get(url + "/apitokens")
    field(d, "Name").send_keys("viewer")
    Select(field(d, "Scope")).select_by_value("read")
    press(d, "Create API token")
    wait_for(d, "the new API token", lambda: d.find_elements(By.ID, "secret"), 10)
    out["read_token"] = d.find_element(By.ID, "secret").text.strip()
    check(out["read_token"].startswith("cat_"), "an API token")
    shot(d, shots, "09-api-token")
    d.get(url + "/usage")
    check("Networks" in d.page_source and "webnet" in d.page_source, "usage lists the network")
    shot(d, shots, "09-usage")
    # At phone width the pages still work (no horizontal scroll of the page itself).
    d.set_window_size(390, 844)
    d.get(url + "/networks/webnet")
    wide = d.execute_script("return document.documentElement.scrollWidth > window.innerWidth + 1")
    check(not wide, "the page fits a phone's width")
    shot(d, shots, "08-phone")
    d.quit()
    return out


GOOD_POLICY = '''[[rule]]
name = "ssh from anywhere"
from = ["*"]
to = ["*"]
proto = "tcp"
ports = ["22"]
'''


def policy(d, shots):
    """The policy editor: a bad document is refused and kept, a good one saved, a test
    answered with its explanation."""
    d.find_element(By.LINK_TEXT, "Access policy").click()
    wait_for(d, "the policy page", lambda: d.current_url.endswith("/policy"), 10)
    text = d.find_element(By.ID, "text")
    text.send_keys("[[rule]]\nfrom = 5\n")
    press(d, "Check and save")
    wait_for(d, "the refusal", lambda: d.find_elements(By.CSS_SELECTOR, "p.error"), 10)
    check("from = 5" in d.find_element(By.ID, "text").get_attribute("value"), "the text is kept")
    shot(d, shots, "05b-policy-refused")
    d.find_element(By.ID, "text").clear()
    d.find_element(By.ID, "text").send_keys(GOOD_POLICY)
    press(d, "Check and save")
    wait_for(d, "the saved policy", lambda: "Revision" in d.find_element(By.ID, "main").text, 10)
    field(d, "From (peer id or hostname)").send_keys("node1")
    field(d, "To (peer, or an address)").send_keys("node1")
    field(d, "Port").clear()
    field(d, "Port").send_keys("22")
    press(d, "Test")
    wait_for(d, "the test result", lambda: d.find_elements(By.CSS_SELECTOR, "section[aria-label='Test result']"), 10)
    result = d.find_element(By.CSS_SELECTOR, "section[aria-label='Test result']").text
    check(result.startswith("allowed"), f"ssh is allowed: {result}")
    saved = d.find_element(By.ID, "text").get_attribute("value")
    check(saved.strip() == GOOD_POLICY.strip(), f"saved as typed: {saved!r}")
    shot(d, shots, "05c-policy-test")
    return {"policy_test": result.splitlines()[0]}


def post_from_page(d, path):
    """A write posted by script from a signed-in page, with its real CSRF token."""
    return d.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const csrf = document.querySelector("input[name=csrf]").value;
        fetch(arguments[0], {method: "POST", credentials: "same-origin",
              headers: {"Content-Type": "application/x-www-form-urlencoded"},
              body: new URLSearchParams({csrf, name: "forged", cidrs: "10.99.0.0/24"})})
          .then(r => done(r.status)).catch(e => done(String(e)));""", path)


def readonly(url, token, shots, network):
    d = browser()
    sign_in(d, url, token, shots, "10-readonly-signin")
    check("read only" in d.page_source, "the header says read only")
    check(not d.find_elements(By.XPATH, "//button[normalize-space()='Create network']"),
          "no create form")
    d.get(url + "/networks/" + network)
    shot(d, shots, "11-readonly-network")
    for b in ("Remove", "Revoke", "Create join token"):
        check(not d.find_elements(By.XPATH, f"//button[normalize-space()='{b}']"), f"no {b}")
    status = post_from_page(d, "/networks")
    check(status == 403, f"a forged write is refused: {status}")
    d.get(url + "/networks")
    check("forged" not in d.page_source, "nothing was created")
    d.quit()
    return {"forged_write_status": status}


def isolation(url, token, shots, paths):
    d = browser()
    out = {}
    if token == "signup":
        # Tenant B signs up on the page (hosted): its first token is shown once, signed in.
        d.get(url + "/signin")
        d.find_element(By.LINK_TEXT, "Sign up").click()
        wait_for(d, "the sign-up page", lambda: d.current_url.endswith("/signup"), 10)
        field(d, "Organisation").send_keys("tenant-b")
        field(d, "Email").send_keys("b@example.test")
        shot(d, shots, "20-signup")
        press(d, "Sign up")
        wait_for(d, "the first API token", lambda: d.find_elements(By.ID, "secret"), 10)
        out["b_token"] = d.find_element(By.ID, "secret").text.strip()
        check(out["b_token"].startswith("cat_"), "an API token")
    else:
        sign_in(d, url, token, shots, "20-tenant-b-signin")
    for p in paths:
        if p.endswith("/remove") or p.endswith("/revoke"):
            d.get(url + "/networks")
            out[p] = post_from_page(d, p)
            check(out[p] == 404, f"POST {p} for B: {out[p]}")
        else:
            d.get(url + p)
            check("not found" in d.page_source.lower(), f"GET {p} is not found for B")
            out[p] = "not found"
    shot(d, shots, "21-tenant-b-not-found")
    d.quit()
    return out


def operator(url, credential, shots, verb, org):
    """The provider's page: every tenant listed; `verb` (Suspend or Resume) tenant `org`."""
    d = browser()
    d.get(url + "/operator/signin")
    field(d, "Operator credential").send_keys(credential)
    press(d, "Sign in as operator")
    wait_for(d, "the tenants page", lambda: d.current_url.endswith("/operator"), 10)
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "tbody tr")]
    check(any("tenant-a" in r for r in rows) and any("tenant-b" in r for r in rows), f"{rows}")
    d.find_element(By.XPATH, f"//button[@aria-label='{verb} tenant {org}']").click()
    want = "suspended" if verb == "Suspend" else "active"
    wait_for(d, f"{org} {want}", lambda: any(org in r.text and want in r.text
             for r in d.find_elements(By.CSS_SELECTOR, "tbody tr")), 10)
    shot(d, shots, f"30-operator-{verb.lower()}")
    # The operator's session opens no tenant's pages.
    d.get(url + "/networks")
    check(d.current_url.endswith("/signin"), "no tenant pages for the operator")
    d.quit()
    return {"operator": verb}


def main():
    cmd, url, token, shots = sys.argv[1:5]
    rest = sys.argv[5:]
    if cmd == "journey":
        out = journey(url, token, shots, rest[rest.index("--") + 1:])
    elif cmd == "readonly":
        out = readonly(url, token, shots, rest[0])
    elif cmd == "operator":
        out = operator(url, token, shots, rest[0], rest[1])
    else:
        out = isolation(url, token, shots, rest)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
