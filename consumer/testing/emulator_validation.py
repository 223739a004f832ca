"""POST /prompt validation, shaped like ComfyUI's execution.validate_prompt / validate_inputs.

Error dicts, their order of checks and their quirks follow the server (errors.json shows them):
widget values are coerced in place, combos longer than 20 options report `input_config: null`,
and nodes invalid only because of an upstream error carry no errors of their own.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from consumer.testing.emulator_nodes import NodeDef, NodeEnv, NodeRegistry, input_spec

Json = dict[str, Any]
Verdict = tuple[bool, list[Json], str]
_MAX_LISTED_OPTIONS = 20
_CONVERTERS: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


@dataclass
class Validation:
    ok: bool
    error: Json | None
    outputs: list[str]
    node_errors: Json = field(default_factory=dict)


def _error(kind: str, message: str, details: str, extra: Json | None = None) -> Json:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def full_type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def validate_node_input(received: object, expected: object) -> bool:
    """execution.validate_node_input (non-strict): equal, wildcard, or overlapping unions."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


class _Validator:
    def __init__(self, registry: NodeRegistry, env: NodeEnv, prompt: Json) -> None:
        self.registry = registry
        self.env = env
        self.prompt = prompt
        self.validated: dict[str, Verdict] = {}

    def node_def(self, node_id: str) -> NodeDef:
        node = self.registry.get(self.prompt[node_id]["class_type"])
        if node is None:
            raise KeyError(self.prompt[node_id]["class_type"])
        return node

    def validate(self, node_id: str) -> Verdict:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.node_def(node_id)
        inputs = self.prompt[node_id]["inputs"]
        errors: list[Json] = []
        valid = True
        for category in ("required", "optional"):
            for name in node.input_types(self.env).get(category, {}):
                valid = self._check_input(node, inputs, name, errors) and valid
        errors += self._custom_validation(node, inputs)
        verdict = (not errors and valid, errors, node_id)
        self.validated[node_id] = verdict
        return verdict

    def _check_input(self, node: NodeDef, inputs: Json, name: str, errors: list[Json]) -> bool:
        """Append this input's errors; False when an upstream node is invalid."""
        spec = input_spec(node, self.env, name)
        assert spec is not None  # noqa: S101 - name comes from the node's own spec
        kind, category, options = spec
        if name not in inputs:
            if category == "required":
                missing = _error("required_input_missing", "Required input is missing", name)
                missing["extra_info"] = {"input_name": name}
                errors.append(missing)
            return True
        value = inputs[name]
        if isinstance(value, list):
            return self._check_link(name, value, [kind, options], errors)
        errors += self._check_widget(node, inputs, name, [kind, options])
        return True

    def _check_link(self, name: str, link: list[Any], info: list[Any], errors: list[Json]) -> bool:
        if len(link) != 2:  # noqa: PLR2004 - [node_id, output_index]
            extra = {"input_name": name, "input_config": info, "received_value": link}
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            errors.append(_error("bad_linked_input", message, name, extra))
            return True
        source = link[0]
        received = self.node_def(source).outputs[link[1]]
        if not validate_node_input(received, info[0]):
            extra = {"input_name": name, "input_config": info, "received_type": received}
            extra["linked_node"] = link
            details = f"{name}, received_type({received}) mismatch input_type({info[0]})"
            message = "Return type mismatch between linked nodes"
            errors.append(_error("return_type_mismatch", message, details, extra))
            return True
        return self._validate_upstream(name, source, link, info)

    def _validate_upstream(self, name: str, source: str, link: list[Any], info: list[Any]) -> bool:
        try:
            return self.validate(source)[0]
        except Exception as ex:
            extra = {"input_name": name, "input_config": info, "exception_message": str(ex)}
            extra |= {"exception_type": full_type_name(ex), "linked_node": link}
            extra["traceback"] = traceback.format_tb(ex.__traceback__)
            message = "Exception when validating inner node"
            reason = _error("exception_during_inner_validation", message, str(ex), extra)
            self.validated[source] = (False, [reason], source)
            return False

    def _check_widget(self, node: NodeDef, inputs: Json, name: str, info: list[Any]) -> list[Json]:
        kind = info[0]
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        try:
            if isinstance(kind, str) and kind in _CONVERTERS:
                value = inputs[name] = _CONVERTERS[kind](value)
        except (TypeError, ValueError) as ex:
            extra = {"input_name": name, "input_config": info, "received_value": value}
            extra["exception_message"] = str(ex)
            message = f"Failed to convert an input value to a {kind} value"
            return [_error("invalid_input_type", message, f"{name}, {value}, {ex}", extra)]
        if name in node.validate_args:
            return []
        return _check_range(name, value, info) or _check_combo(name, value, info)

    def _custom_validation(self, node: NodeDef, inputs: Json) -> list[Json]:
        if node.validate is None or any(x not in inputs for x in node.validate_args):
            return []
        result = node.validate(self.env, inputs)
        if result is True:
            return []
        details_suffix = "" if result is False else f" - {result}"
        message = "Custom validation failed for node"
        return [
            _error("custom_validation_failed", message, f"{x}{details_suffix}", {"input_name": x})
            for x in node.validate_args
        ]


def _check_range(name: str, value: Any, info: list[Any]) -> list[Json]:
    options = info[1]
    extra = {"input_name": name, "input_config": info, "received_value": value}
    if "min" in options and value < options["min"]:
        message = f"Value {value} smaller than min of {options['min']}"
        return [_error("value_smaller_than_min", message, name, extra)]
    if "max" in options and value > options["max"]:
        message = f"Value {value} bigger than max of {options['max']}"
        return [_error("value_bigger_than_max", message, name, extra)]
    return []


def _check_combo(name: str, value: Any, info: list[Any]) -> list[Json]:
    kind, options = info
    if not isinstance(kind, list) and kind != "COMBO":
        return []
    choices = kind if isinstance(kind, list) else options.get("options", [])
    if value in choices:
        return []
    config: list[Any] | None = info
    listed = str(choices)
    if len(choices) > _MAX_LISTED_OPTIONS:
        listed, config = f"(list of length {len(choices)})", None
    extra = {"input_name": name, "input_config": config, "received_value": value}
    return [
        _error(
            "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}", extra
        )
    ]


def _class_error(registry: NodeRegistry, prompt: Json) -> Json | None:
    """`invalid_prompt` for the first node without class_type or of an unknown class."""
    for node_id, node in prompt.items():
        if "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            return _error("invalid_prompt", message, f"Node ID '#{node_id}'")
        if registry.get(node["class_type"]) is None:
            message = f"Cannot execute because node {node['class_type']} does not exist."
            return _error("invalid_prompt", message, f"Node ID '#{node_id}'")
    return None


def _output_ids(registry: NodeRegistry, prompt: Json, targets: list[str] | None) -> list[str]:
    outputs = []
    for node_id, node in prompt.items():
        node_def = registry.get(node["class_type"])
        if (
            node_def is not None
            and node_def.output_node
            and (targets is None or node_id in targets)
        ):
            outputs.append(node_id)
    return outputs


def _validate_output(validator: _Validator, output_id: str) -> Verdict:
    try:
        return validator.validate(output_id)
    except Exception as ex:
        extra: Json = {"exception_type": full_type_name(ex)}
        extra["traceback"] = traceback.format_tb(ex.__traceback__)
        message = "Exception when validating node"
        reasons = [_error("exception_during_validation", message, str(ex), extra)]
        validator.validated[output_id] = (False, reasons, output_id)
        return validator.validated[output_id]


def _collect_node_errors(validator: _Validator, output_id: str, node_errors: Json) -> None:
    for node_id, (valid, reasons, _) in validator.validated.items():
        if valid or not reasons:
            continue
        if node_id not in node_errors:
            class_type = validator.prompt[node_id]["class_type"]
            entry = {"errors": reasons, "dependent_outputs": [], "class_type": class_type}
            node_errors[node_id] = entry
        node_errors[node_id]["dependent_outputs"].append(output_id)


def validate_prompt(
    registry: NodeRegistry, env: NodeEnv, prompt: Json, targets: list[str] | None = None
) -> Validation:
    """The verdict POST /prompt turns into 200 or 400."""
    first_error = _class_error(registry, prompt)
    if first_error is not None:
        return Validation(ok=False, error=first_error, outputs=[])
    outputs = _output_ids(registry, prompt, targets)
    if not outputs:
        no_outputs = _error("prompt_no_outputs", "Prompt has no outputs", "")
        return Validation(ok=False, error=no_outputs, outputs=[])
    validator = _Validator(registry, env, prompt)
    good: list[str] = []
    reasons_text: list[str] = []
    node_errors: Json = {}
    for output_id in outputs:
        valid, reasons, _ = _validate_output(validator, output_id)
        if valid:
            good.append(output_id)
            continue
        reasons_text += [f"{r['message']}: {r['details']}" for r in reasons]
        _collect_node_errors(validator, output_id, node_errors)
    if not good:
        message = "Prompt outputs failed validation"
        joined = "\n".join(reasons_text)
        failed = _error("prompt_outputs_failed_validation", message, joined)
        return Validation(ok=False, error=failed, outputs=[], node_errors=node_errors)
    return Validation(ok=True, error=None, outputs=good, node_errors=node_errors)
