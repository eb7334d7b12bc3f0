"""The base every Kiln API model shares, and the small pieces the CRD generator reads off it.

Models are written in Python naming and serialized in Kubernetes' camelCase. Each field's description is
the docstring beneath it (pydantic's ``use_attribute_docstrings``), so the CRD, ``kubectl explain`` and
``docs/api.md`` all quote the same sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# CEL's cost estimator multiplies by the worst-case size of every string, list and map a rule can touch;
# without these bounds the apiserver refuses the CRD. They also keep objects well under etcd's 1.5 MiB limit.
MAX_NAME = 253
MAX_URI = 2048
MAX_TEXT = 32768
MAX_LIST = 64
MAX_MAP = 64

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
# A URI as Kiln reports it (status). What users write goes through StorageUri below, which is checked.
Uri = Annotated[str, Field(min_length=1, max_length=MAX_URI)]
# A Kubernetes resource quantity ("4", "500m", "16Gi"); YAML users write bare integers too.
Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


class KilnModel(BaseModel):
    """Strict, immutable, camelCase: unknown fields are errors, never silently dropped, and no value changes
    type on the way in ("10" is not an integer, "true" not a boolean), because the apiserver coerces nothing
    either and `kiln validate` must accept exactly what it accepts."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # pydantic leaves default_factory defaults out of the schema. The CRD needs them: `default: {}` on a
        # nested object is what makes the apiserver fill in that object's own defaults.
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        for name, field in cls.model_fields.items():
            if field.default_factory is not None:
                value = field.default_factory()  # type: ignore[call-arg]
                target["properties"][field.alias or name]["default"] = {} if isinstance(value, BaseModel) else value
        return schema

    def to_dict(self) -> dict[str, Any]:
        """The Kubernetes-shaped JSON form: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


@dataclass(frozen=True)
class Rule:
    """A cross-field rule stated once and enforced twice: by the apiserver as CEL, by pydantic as Python.

    ``holds`` is None for transition rules, which only the apiserver can check (it alone sees ``oldSelf``).
    ``field`` is the camelCase path, relative to the model, that the error message points at.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool] | None = None
    field: str | None = None

    def to_cel(self) -> dict[str, str]:
        return cel(self.cel, self.message, f".{self.field}" if self.field else None)


@dataclass(frozen=True)
class Pattern:
    """A rule on one string field, stated once as a regular expression and enforced twice: by the apiserver
    (CEL ``self.matches``, RE2) and by pydantic (``re.search``). Patterns stay inside the syntax both
    engines read the same way: anchors, classes, counted repeats, alternation; no backslashes."""

    alternatives: tuple[str, ...]
    message: str

    def __post_init__(self) -> None:
        assert not any("\\" in alternative or "'" in alternative for alternative in self.alternatives)

    @property
    def cel(self) -> str:
        return " || ".join(f"self.matches('{alternative}')" for alternative in self.alternatives)

    def holds(self, value: str) -> bool:
        return any(re.search(alternative, value) for alternative in self.alternatives)

    def check(self, value: str) -> str:
        if not self.holds(value):
            raise ValueError(self.message)
        return value

    def annotations(self) -> tuple[Any, ...]:
        """Annotated metadata: the CEL rule in the field's schema, and the same check as a validator."""
        rules: list[Any] = [cel(self.cel, self.message)]
        return (
            Field(json_schema_extra={"x-kubernetes-validations": rules}),
            AfterValidator(self.check),
        )


STORAGE_URI = Pattern(
    # s3://<bucket>[/key] with S3's bucket naming; file:///<absolute path>; or a plain path with no scheme.
    alternatives=("^s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/.*)?$", "^file:///", "^[^:]*$", "^[^:]*[/][^/]*:"),
    message="must be s3://bucket/key, a local path, or file:///path; other schemes are not supported",
)
HTTP_URL = Pattern(
    alternatives=("^https?://[^/ ]+(/[^ ]*)?$",),
    message="must be an http:// or https:// URL, for example https://minio.example:9000",
)

# A URI a user writes: where data, weights, checkpoints and outputs live.
StorageUri = Annotated[str, Field(min_length=1, max_length=MAX_URI), *STORAGE_URI.annotations()]
# The S3 endpoint of an S3-compatible server.
HttpUrl = Annotated[str, Field(min_length=1, max_length=MAX_URI), *HTTP_URL.annotations()]


class RuleModel(KilnModel):
    """A model carrying ``__rules__``: they become ``x-kubernetes-validations`` and a pydantic check."""

    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.__rules__:
            if rule.holds is not None and not rule.holds(self):
                raise PydanticCustomError("kiln_rule", rule.message, {"field": rule.field or ""})
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        if cls.__rules__:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_cel() for rule in cls.__rules__]
        return schema
