"""Rewrites one generated section of docs/PERFORMANCE.md: the text between
a begin and an end marker, or, the first time, a new section at the end."""


def write_section(doc, section, begin, end, after=None):
    """section includes its markers. The first time, it goes right after
    the line holding `after` where given and present."""
    with open(doc) as f:
        text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif after and after in text:
        head, rest = text.split(after, 1)
        line_end = rest.find("\n") + 1 if "\n" in rest else len(rest)
        text = head + after + rest[:line_end] + "\n" + section + "\n" + rest[line_end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(doc, "w") as f:
        f.write(text)
