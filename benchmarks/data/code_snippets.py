# Small Python functions for benchmarks/speculative.py's code-edit prompts (one function per snippet, split on the
# blank lines between them). Not imported by anything.

def word_counts(text, min_length=1):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?\"'()")
        if len(word) < min_length:
            continue
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def chunk(items, size):
    if size <= 0:
        raise ValueError("size must be positive")
    chunks = []
    for start in range(0, len(items), size):
        chunks.append(items[start:start + size])
    return chunks


def moving_average(values, window):
    if window <= 0 or window > len(values):
        return []
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


def parse_key_values(line, separator=";", assign="="):
    result = {}
    for part in line.split(separator):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition(assign)
        result[key.strip()] = value.strip()
    return result


def binary_search(sorted_items, target):
    low, high = 0, len(sorted_items) - 1
    while low <= high:
        middle = (low + high) // 2
        if sorted_items[middle] == target:
            return middle
        if sorted_items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


def flatten(nested):
    flat = []
    stack = [iter(nested)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, (list, tuple)):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def read_config(path, defaults=None):
    config = dict(defaults or {})
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{number}: expected key = value")
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    return config


def merge_intervals(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def format_table(rows, headers):
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(str(cell)))
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def retry(function, attempts=3, delay=0.5, exceptions=(Exception,)):
    import time

    for attempt in range(1, attempts + 1):
        try:
            return function()
        except exceptions:
            if attempt == attempts:
                raise
            time.sleep(delay * attempt)
