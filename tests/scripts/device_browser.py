"""Plays the user's browser in an OAuth device flow against the test OpenID
provider (tests/oidc/provider.mjs): opens the verification link (code filled in),
confirms the code, signs in on the provider's login form, consents. The provider's
real HTML pages are driven form by form, as tests/identity.rs does in Rust.

Test and demo only (the provider's login form accepts any password).
Usage: python device_browser.py URL LOGIN      exits 0 once the provider says
"Sign-in Success", 1 otherwise. Standard library only.
"""

import http.cookiejar
import sys
import urllib.parse
import urllib.request
from html.parser import HTMLParser

# Most pages one sign-in may take before it is called a loop.
MAX_PAGES = 10
# Largest page read.
MAX_PAGE = 256 * 1024


class FirstForm(HTMLParser):
    def __init__(self):
        super().__init__()
        self.action = None
        self.fields = []
        self.state = "before"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.state == "before":
            self.state = "in"
            self.action = a.get("action")
        elif tag == "input" and self.state == "in" and a.get("name"):
            self.fields.append((a["name"], a.get("value") or ""))

    def handle_endtag(self, tag):
        if tag == "form" and self.state == "in":
            self.state = "after"


def main():
    url, login = sys.argv[1], sys.argv[2]
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with opener.open(url, timeout=10) as r:
        page_url, page = r.geturl(), r.read(MAX_PAGE).decode("utf-8", "replace")
    for _ in range(MAX_PAGES):
        if "Sign-in Success" in page:
            return 0
        form = FirstForm()
        form.feed(page)
        if form.action is None:
            print(f"no form on {page_url}", file=sys.stderr)
            return 1
        fields = []
        for name, value in form.fields:
            if name == "login":
                value = login
            elif name == "password":
                value = "correct horse"
            fields.append((name, value))
        action = urllib.parse.urljoin(page_url, form.action)
        data = urllib.parse.urlencode(fields).encode()
        with opener.open(action, data=data, timeout=10) as r:
            page_url, page = r.geturl(), r.read(MAX_PAGE).decode("utf-8", "replace")
    print(f"the sign-in did not finish; last page {page_url}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
