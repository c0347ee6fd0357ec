#!/usr/bin/env python3
"""Plays the user of an OAuth device authorization: opens the verification link
(with the code filled in), confirms the code, signs in to the test provider
(tests/oidc/provider.mjs, whose login form accepts any password for its known
accounts) and consents. Drives the provider's real HTML pages with `requests`.

Usage: device_browser.py URL USER   (exit 0 once the provider says "Sign-in Success")
"""

import sys
from html.parser import HTMLParser
from urllib.parse import urljoin

import requests


class FirstForm(HTMLParser):
    def __init__(self):
        super().__init__()
        self.action, self.fields, self.depth, self.done = None, [], 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.done:
            return
        if tag == "form" and self.action is None:
            self.action, self.depth = a.get("action", ""), 1
        elif tag == "input" and self.depth and a.get("name"):
            self.fields.append((a["name"], a.get("value") or ""))

    def handle_endtag(self, tag):
        if tag == "form" and self.depth:
            self.depth, self.done = 0, True


def main():
    url, user = sys.argv[1], sys.argv[2]
    s = requests.Session()
    page = s.get(url, timeout=10)
    for _ in range(10):
        if "Sign-in Success" in page.text:
            return 0
        form = FirstForm()
        form.feed(page.text)
        if form.action is None:
            print(f"no form on {page.url}", file=sys.stderr)
            return 1
        fields = [
            (n, user if n == "login" else "correct horse" if n == "password" else v)
            for n, v in form.fields
        ]
        page = s.post(urljoin(page.url, form.action), data=fields, timeout=10)
    print(f"the flow did not finish; last page {page.url}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
