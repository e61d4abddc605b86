"""Rewrites one generated section of docs/PERFORMANCE.md: the text between
a begin and an end marker, or, the first time, a new section at the end."""


def write_section(doc, section, begin, end):
    """section includes its markers."""
    with open(doc) as f:
        text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(doc, "w") as f:
        f.write(text)
