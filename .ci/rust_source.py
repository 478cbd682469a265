"""What the .ci checks read of Rust source: the code without comments,
strings and characters (lines kept), and without `#[cfg(test)]` modules."""

import re

TEST_MODULE = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))?\s+)?mod\s+\w+\s*\{")


def blank(text):
    """`text` with everything but line breaks replaced by spaces."""
    return re.sub(r"[^\n]", " ", text)


def code_only(source):
    """`source` with comments, strings and characters blanked out, lines kept."""
    out = []
    index, length = 0, len(source)
    while index < length:
        if source.startswith("//", index):
            end = source.find("\n", index)
            end = length if end < 0 else end
        elif source.startswith("/*", index):
            end = source.find("*/", index)
            end = length if end < 0 else end + 2
        elif (raw := re.match(r'b?r(#*)"', source[index:index + 260])) and (
            index == 0 or not (source[index - 1].isalnum() or source[index - 1] == "_")
        ):
            close = '"' + raw.group(1)
            end = source.find(close, index + len(raw.group(0)))
            end = length if end < 0 else end + len(close)
        elif source[index] == '"':
            end = index + 1
            while end < length and source[end] != '"':
                end += 2 if source[end] == "\\" else 1
            end += 1
        elif source[index] == "'" and (
            char := re.match(r"'(?:\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'])'", source[index:index + 12])
        ):
            end = index + len(char.group(0))
        else:
            out.append(source[index])
            index += 1
            continue
        out.append(blank(source[index:end]))
        index = end
    return "".join(out)


def without_test_modules(code):
    out = []
    at = 0
    while True:
        found = TEST_MODULE.search(code, at)
        if not found:
            out.append(code[at:])
            return "".join(out)
        out.append(code[at:found.start()])
        depth, index = 1, found.end()
        while depth and index < len(code):
            depth += {"{": 1, "}": -1}.get(code[index], 0)
            index += 1
        out.append(blank(code[found.start():index]))
        at = index
