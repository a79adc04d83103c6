"""An absolute-path detector for the publishing tests, written independently of
fer_lib.publish's own scrubber so that the tests do not trust the code they check."""
import re

# Independent of fer_lib.publish's own regexes. An absolute POSIX path with 2+ components: a
# '/' that does not continue a word or a relative path ('runs/cpu/x', './x', '~/x' are fine),
# then at least one 'component/' ('/data' alone is not a path here, '/tmp/x' is). ANSI colour
# codes are removed first (IPython writes '\x1b[0;32m/home/u/x.py'), and URLs other than
# file: URLs are not paths. Windows: a drive letter path or a UNC path.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
URL = re.compile(r"\b(?!file:)[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*")
POSIX = re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)+")
WINDOWS = re.compile(r"(?<!\w)[A-Za-z]:[\\/]|\\\\[\w.$-]+\\")
BINARY = {"image/png", "image/jpeg", "image/gif", "application/pdf"}


def absolute_paths(text):
    text = URL.sub(" ", ANSI.sub("", text))
    return POSIX.findall(text) + WINDOWS.findall(text)


def strings(node, mimetype=None):
    """Every string in a notebook's JSON tree, except base64 payloads ('/' is base64)."""
    if isinstance(node, str):
        if mimetype not in BINARY:
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item, mimetype)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, dict):
                for mime, payload in value.items():
                    yield from strings(payload, mime)
            elif key != "attachments":
                yield from strings(value, mimetype)
