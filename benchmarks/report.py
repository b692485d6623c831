"""Output shared by the benchmark scripts: a two-column table of `section.measure value`, then one JSON object."""

import json


def print_sections(result: dict) -> None:
    print(f"{'measure':40} value")
    for section, values in result.items():
        for key, value in values.items():
            print(f"{section + '.' + key:40} {value}")
    print(json.dumps(result))
