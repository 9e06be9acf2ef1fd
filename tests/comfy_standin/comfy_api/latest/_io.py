"""Stand-in for comfy_api.latest.io: typed inputs/outputs, Schema, ComfyNode, NodeOutput.
Keyword arguments are limited to those the real API takes, so a typo or an unsupported option
fails here as it would in ComfyUI."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_COMMON = {"display_name", "optional", "tooltip", "lazy", "advanced"}
_WIDGET = {"default", "socketless", "force_input"}
_NUMBER = {"min", "max", "step", "control_after_generate", "display_mode"}


@dataclass
class Input:
    id: str
    io_type: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def optional(self) -> bool:
        return bool(self.options.get("optional"))


@dataclass
class Output:
    io_type: str
    id: str | None = None
    display_name: str | None = None
    tooltip: str | None = None


class ComfyType:
    io_type = "*"
    allowed: set[str] = _COMMON

    @classmethod
    def Input(cls, id: str, **options) -> Input:
        unknown = set(options) - cls.allowed
        if unknown:
            raise TypeError(f"{cls.__name__}.Input got unsupported option(s) {sorted(unknown)}")
        return Input(id, cls.io_type, options)

    @classmethod
    def Output(cls, id: str | None = None, display_name: str | None = None, tooltip: str | None = None) -> Output:
        return Output(cls.io_type, id, display_name, tooltip)


def _type(name: str, io_type: str, allowed=_COMMON):
    return type(name, (ComfyType,), {"io_type": io_type, "allowed": set(allowed)})


Model = _type("Model", "MODEL")
Conditioning = _type("Conditioning", "CONDITIONING")
Latent = _type("Latent", "LATENT")
Image = _type("Image", "IMAGE")
Int = _type("Int", "INT", _COMMON | _WIDGET | _NUMBER)
Float = _type("Float", "FLOAT", _COMMON | _WIDGET | _NUMBER | {"round"})
String = _type("String", "STRING", _COMMON | _WIDGET | {"multiline", "placeholder", "dynamic_prompts"})
Boolean = _type("Boolean", "BOOLEAN", _COMMON | _WIDGET | {"label_on", "label_off"})


class Combo(ComfyType):
    io_type = "COMBO"
    allowed = _COMMON | _WIDGET | {"options", "control_after_generate", "upload", "remote"}

    @classmethod
    def Input(cls, id: str, **options) -> Input:
        inp = super().Input(id, **options)
        opts = inp.options.get("options")
        if not opts:
            raise ValueError(f"combo {id!r} needs options")
        if "default" in inp.options and inp.options["default"] not in opts:
            raise ValueError(f"combo {id!r}: default {inp.options['default']!r} not among options")
        return inp


def Custom(io_type: str) -> type[ComfyType]:
    return _type(f"Custom_{io_type}", io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.node_id}: duplicate input ids {ids}")


class NodeOutput:
    def __init__(self, *args: Any, ui: dict | None = None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args or None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema
