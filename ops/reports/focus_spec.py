"""The FOCUS 1.2 column rules (plus the 1.3 allocation columns) as a validator of exported rows."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

# Column ID → (data type, nullable). Data types: decimal, string, datetime, json. Mandatory columns first.
MANDATORY: dict[str, tuple[str, bool]] = {
    "BilledCost": ("decimal", False), "BillingAccountId": ("string", False), "BillingAccountName": ("string", True),
    "BillingCurrency": ("string", False), "BillingPeriodEnd": ("datetime", False),
    "BillingPeriodStart": ("datetime", False), "ChargeCategory": ("string", False), "ChargeClass": ("string", True),
    "ChargeDescription": ("string", True), "ChargePeriodEnd": ("datetime", False),
    "ChargePeriodStart": ("datetime", False), "ContractedCost": ("decimal", False),
    "EffectiveCost": ("decimal", False), "InvoiceIssuerName": ("string", False), "ListCost": ("decimal", False),
    "PricingQuantity": ("decimal", True), "PricingUnit": ("string", True), "ProviderName": ("string", False),
    "PublisherName": ("string", False), "ServiceCategory": ("string", False), "ServiceName": ("string", False),
}
OPTIONAL: dict[str, tuple[str, bool]] = {
    "AvailabilityZone": ("string", True), "BillingAccountType": ("string", False),
    "ChargeFrequency": ("string", False), "ConsumedQuantity": ("decimal", True), "ConsumedUnit": ("string", True),
    "ContractedUnitPrice": ("decimal", True), "InvoiceId": ("string", True), "ListUnitPrice": ("decimal", True),
    "PricingCategory": ("string", True), "RegionId": ("string", True), "RegionName": ("string", True),
    "ResourceId": ("string", True), "ResourceName": ("string", True), "ResourceType": ("string", True),
    "ServiceSubcategory": ("string", False), "SkuId": ("string", True), "SkuMeter": ("string", True),
    "SkuPriceDetails": ("json", True), "SkuPriceId": ("string", True), "SubAccountId": ("string", True),
    "SubAccountName": ("string", True), "SubAccountType": ("string", True), "Tags": ("json", True),
    # FOCUS 1.3: data generator-calculated split cost allocation.
    "AllocatedMethodId": ("string", True), "AllocatedMethodDetails": ("json", True),
    "AllocatedResourceId": ("string", True), "AllocatedResourceName": ("string", True),
    "AllocatedTags": ("json", True),
}
COLUMNS: dict[str, tuple[str, bool]] = {**MANDATORY, **OPTIONAL}

CHARGE_CATEGORIES = frozenset({"Usage", "Purchase", "Tax", "Credit", "Adjustment"})
CHARGE_FREQUENCIES = frozenset({"One-Time", "Recurring", "Usage-Based"})
PRICING_CATEGORIES = frozenset({"Standard", "Dynamic", "Committed", "Other"})
SERVICE_CATEGORIES = frozenset({
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases", "Developer Tools",
    "Multicloud", "Identity", "Integration", "Internet of Things", "Management and Governance", "Media",
    "Migration", "Mobile", "Networking", "Security", "Storage", "Web", "Other"})
# The subcategories of the categories tally exports (the spec lists one parent per subcategory).
AI_SUBCATEGORIES = frozenset({"AI Platforms", "Bots", "Generative AI", "Machine Learning",
                              "Natural Language Processing", "Other (AI and Machine Learning)"})
# Columns that must not be null for a Usage or Purchase charge that is not a correction, and null for Tax.
PRICED_COLUMNS = ("PricingQuantity", "ListUnitPrice", "ContractedUnitPrice", "SkuId", "SkuPriceId",
                  "PricingCategory")
KEY_VALUE_COLUMNS = ("Tags", "SkuPriceDetails", "AllocatedTags")
METRICS = frozenset({"BilledCost", "ContractedCost", "EffectiveCost", "ListCost", "PricingQuantity",
                     "ConsumedQuantity", "ListUnitPrice", "ContractedUnitPrice"})
ALLOCATION = frozenset({"AllocatedMethodId", "AllocatedMethodDetails", "AllocatedResourceId",
                        "AllocatedResourceName", "AllocatedTags"})

_NUMERIC_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?(E-?[0-9]+)?$")
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_CUSTOM_RE = re.compile(r"^x_[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Problem:
    """One rule a row (1-based, or 0 for the dataset) breaks."""

    row: int
    column: str
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row else "dataset"
        return f"{where}: {self.column}: {self.message}"


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str) and _NUMERIC_RE.match(value):
        try:
            return Decimal(value)
        except InvalidOperation:
            return None
    return None


def _json_object(value: Any) -> dict[str, Any] | None:
    try:
        parsed = json.loads(value, parse_float=Decimal) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _check_columns(columns: Sequence[str]) -> list[Problem]:
    out = [Problem(0, c, "mandatory column missing") for c in MANDATORY if c not in columns]
    seen_custom = False
    for c in columns:
        if c in COLUMNS:
            if seen_custom:
                out.append(Problem(0, c, "FOCUS columns come before custom (x_) columns"))
        elif _CUSTOM_RE.match(c):
            seen_custom = True
        else:
            out.append(Problem(0, c, "neither a FOCUS column nor a custom column prefixed x_"))
    if len(set(columns)) != len(columns):
        out.append(Problem(0, "*", "duplicate column names"))
    return out


def _check_value(n: int, col: str, value: Any, out: list[Problem]) -> None:
    kind, nullable = COLUMNS[col]
    if value is None:
        if not nullable:
            out.append(Problem(n, col, "must not be null"))
        return
    if isinstance(value, str) and not value.strip():
        out.append(Problem(n, col, "empty string: use null (NullHandling)"))
    elif kind == "decimal" and _decimal(value) is None:
        out.append(Problem(n, col, f"{value!r} is not a NumericFormat decimal"))
    elif kind == "datetime" and not (isinstance(value, str) and _DATETIME_RE.match(value)):
        out.append(Problem(n, col, f"{value!r} is not YYYY-MM-DDTHH:mm:ssZ (UTC)"))
    elif kind == "json":
        obj = _json_object(value)
        if obj is None:
            out.append(Problem(n, col, "not a serialized JSON object"))
        elif col in KEY_VALUE_COLUMNS and any(isinstance(v, dict | list) for v in obj.values()):
            out.append(Problem(n, col, "KeyValueFormat values must be numbers, strings, booleans or null"))
    elif kind == "string" and not isinstance(value, str):
        out.append(Problem(n, col, f"{value!r} is not a string"))


def _allowed(n: int, row: Mapping[str, Any], out: list[Problem]) -> None:
    for col, allowed in (("ChargeCategory", CHARGE_CATEGORIES), ("ChargeFrequency", CHARGE_FREQUENCIES),
                         ("PricingCategory", PRICING_CATEGORIES), ("ServiceCategory", SERVICE_CATEGORIES)):
        v = row.get(col)
        if v is not None and v not in allowed:
            out.append(Problem(n, col, f"{v!r} is not an allowed value ({', '.join(sorted(allowed))})"))
    if row.get("ChargeClass") not in (None, "Correction"):
        out.append(Problem(n, "ChargeClass", "must be null or \"Correction\""))
    sub = row.get("ServiceSubcategory")
    if sub is not None and row.get("ServiceCategory") == "AI and Machine Learning" and sub not in AI_SUBCATEGORIES:
        out.append(Problem(n, "ServiceSubcategory", f"{sub!r} is not a subcategory of AI and Machine Learning"))
    currency = row.get("BillingCurrency")
    if currency is not None and not _CURRENCY_RE.match(str(currency)):
        out.append(Problem(n, "BillingCurrency", f"{currency!r} is not an ISO 4217 code"))
    if row.get("ChargeCategory") == "Purchase" and row.get("ChargeFrequency") == "Usage-Based":
        out.append(Problem(n, "ChargeFrequency", "must not be Usage-Based for a Purchase"))


def _conditional(n: int, row: Mapping[str, Any], present: set[str], out: list[Problem]) -> None:
    category = row.get("ChargeCategory")
    correction = row.get("ChargeClass") == "Correction"
    for col in PRICED_COLUMNS:
        if col not in present:
            continue
        if category in ("Usage", "Purchase") and not correction and row.get(col) is None:
            out.append(Problem(n, col, f"must not be null for a {category} charge that is not a correction"))
        if category == "Tax" and row.get(col) is not None:
            out.append(Problem(n, col, "must be null for a Tax charge"))
    for dependent, on in (("PricingUnit", "PricingQuantity"), ("ConsumedUnit", "ConsumedQuantity"),
                          ("AllocatedResourceName", "AllocatedResourceId")):
        if dependent in present and (row.get(dependent) is None) != (row.get(on) is None):
            out.append(Problem(n, dependent, f"must be null exactly when {on} is null"))
    if "ConsumedQuantity" in present:
        if category != "Usage" and row.get("ConsumedQuantity") is not None:
            out.append(Problem(n, "ConsumedQuantity", "must be null unless ChargeCategory is Usage"))
        if category == "Usage" and not correction and row.get("ConsumedQuantity") is None:
            out.append(Problem(n, "ConsumedQuantity", "must not be null for Usage that is not a correction"))
    for dependent, on in (("SkuMeter", "SkuId"), ("SkuPriceDetails", "SkuPriceId")):
        if dependent in present and row.get(on) is None and row.get(dependent) is not None:
            out.append(Problem(n, dependent, f"must be null when {on} is null"))
    for col in ("ListUnitPrice", "ContractedUnitPrice"):
        price = _decimal(row.get(col))
        if price is not None and price < 0:
            out.append(Problem(n, col, "must not be negative"))


def _arithmetic(n: int, row: Mapping[str, Any], out: list[Problem]) -> None:
    if row.get("ChargeClass") == "Correction":
        return
    qty = _decimal(row.get("PricingQuantity"))
    for price_col, cost_col in (("ListUnitPrice", "ListCost"), ("ContractedUnitPrice", "ContractedCost")):
        price, cost = _decimal(row.get(price_col)), _decimal(row.get(cost_col))
        if qty is not None and price is not None and cost is not None and qty * price != cost:
            out.append(Problem(n, cost_col, f"PricingQuantity × {price_col} = {qty * price}, not {cost} (must match "
                                            "exactly)"))
    for start_col, end_col in (("ChargePeriodStart", "ChargePeriodEnd"), ("BillingPeriodStart", "BillingPeriodEnd")):
        start, end = row.get(start_col), row.get(end_col)
        if isinstance(start, str) and isinstance(end, str) and not start < end:
            out.append(Problem(n, end_col, f"{end} is not after {start_col} {start} (exclusive end bound)"))
    cs, ce, bs, be = (row.get(c) for c in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart",
                                           "BillingPeriodEnd"))
    if all(isinstance(v, str) for v in (cs, ce, bs, be)) and not (str(bs) <= str(cs) and str(ce) <= str(be)):
        out.append(Problem(n, "ChargePeriodStart", "the charge period is not inside the billing period"))


def _allocation(n: int, row: Mapping[str, Any], present: set[str], out: list[Problem]) -> Decimal | None:
    """Check one row's allocation columns; return its AllocatedRatio sum when it is an allocated charge."""
    method = row.get("AllocatedMethodId")
    if method is None:
        for col in ("AllocatedMethodDetails", "AllocatedTags", "AllocatedResourceId"):
            if col in present and row.get(col) is not None:
                out.append(Problem(n, col, "must be null when the charge is not a split cost allocation "
                                           "(AllocatedMethodId null)"))
        return None
    if "AllocatedResourceId" in present and row.get("AllocatedResourceId") is None:
        out.append(Problem(n, "AllocatedResourceId", "must not be null for an allocated charge"))
    tags, allocated = _json_object(row.get("Tags")) or {}, _json_object(row.get("AllocatedTags")) or {}
    for key in sorted(set(tags) & set(allocated)):
        out.append(Problem(n, "AllocatedTags", f"key {key!r} is already in Tags"))
    details = _json_object(row.get("AllocatedMethodDetails"))
    elements = details.get("Elements") if details is not None else None
    if not isinstance(elements, list) or not elements or not all(isinstance(e, dict) for e in elements):
        out.append(Problem(n, "AllocatedMethodDetails", "must be an object whose Elements is a non-empty array of "
                                                        "objects"))
        return None
    total = Decimal(0)
    for e in elements:
        ratio = e.get("AllocatedRatio")
        if not isinstance(ratio, Decimal | int) or isinstance(ratio, bool):
            out.append(Problem(n, "AllocatedMethodDetails", "every element needs a numeric AllocatedRatio"))
            return None
        if "UsageQuantity" in e and "UsageUnit" not in e:
            out.append(Problem(n, "AllocatedMethodDetails", "UsageUnit is required with UsageQuantity"))
        total += Decimal(ratio)
    return total


def validate(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[Problem]:
    """Check a FOCUS dataset against the spec's column rules; returns every problem (empty = valid).

    Rules: mandatory columns present; known columns or x_ custom columns (after the FOCUS ones); types
    (NumericFormat decimals, UTC date/times, JSON objects, KeyValueFormat); nullability (no empty strings);
    allowed values; the Usage/Purchase/Tax conditional nullability of pricing and SKU columns; unit/quantity
    pairs; PricingQuantity × ListUnitPrice = ListCost and × ContractedUnitPrice = ContractedCost exactly; period
    bounds; and the 1.3 allocation rules (columns null unless allocated, AllocatedTags disjoint from Tags, the
    AllocatedRatio of the allocated charges of one origin charge summing to exactly 1). Values are Python values
    or CSV strings (None = null).
    """
    out = _check_columns(columns)
    present = set(columns)
    origin_ratio: dict[tuple[Any, ...], Decimal] = defaultdict(Decimal)
    dims = [c for c in columns if c in COLUMNS and c not in METRICS and c not in ALLOCATION]
    for n, cells in enumerate(rows, start=1):
        row = dict(zip(columns, cells, strict=True))
        for col in columns:
            if col in COLUMNS:
                _check_value(n, col, row[col], out)
        _allowed(n, row, out)
        _conditional(n, row, present, out)
        _arithmetic(n, row, out)
        ratio = _allocation(n, row, present, out)
        if ratio is not None:
            origin_ratio[(row.get("AllocatedMethodId"), *(row.get(c) for c in dims))] += ratio
    for origin, total in origin_ratio.items():
        if total != 1:
            out.append(Problem(0, "AllocatedMethodDetails", f"the AllocatedRatio of the allocated charges of origin "
                                                            f"{origin[:4]}… sum to {total}, not 1"))
    return out


def validate_csv(text: str) -> list[Problem]:
    """Validate a FOCUS CSV export (an empty cell is null)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    return validate(header, ([c if c != "" else None for c in r] for r in reader))
