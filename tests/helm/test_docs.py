"""The chart README documents every value; values.schema.json covers every value."""

import json
import re

import jsonschema

from tests.helm.chart import CHART, values_yaml


def leaves(node, schema, prefix=""):
    """Leaf keys of values.yaml. Objects the schema describes with `properties` are descended into; free-form
    maps (labels, selectors, resources' extra keys) and lists are one value each."""
    if isinstance(node, dict) and "properties" in schema:
        for key, value in node.items():
            assert key in schema["properties"], f"{prefix}.{key} is not in values.schema.json"
            yield from leaves(value, schema["properties"][key], f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def schema():
    return json.loads((CHART / "values.schema.json").read_text())


def test_values_yaml_passes_its_schema():
    jsonschema.Draft7Validator.check_schema(schema())
    jsonschema.Draft7Validator(schema()).validate(values_yaml())


def test_every_value_is_documented_in_the_chart_readme():
    table = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    documented = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    keys = list(leaves(values_yaml(), schema()))
    assert len(keys) > 50
    assert not set(keys) - set(documented), f"values missing from helm/kvstash/README.md: {sorted(set(keys) - set(documented))}"
    assert not set(documented) - set(keys), f"README documents values that do not exist: {sorted(set(documented) - set(keys))}"
    assert len(documented) == len(set(documented)), "a value is documented twice"
