"""``--where`` filters (:meth:`CatalogQuery.where <catalogpred.query.CatalogQuery.where>`) and column lists.

Filters are pandas expressions on column names, evaluated with pandas' python engine (``_eval_filter``); the
integer literals of bit tests (``"(flags & 4) > 0"``) are given to pandas as columns (``_bitwise_literals``).
:func:`check_column_list` reads the ``--columns``/``select`` lists.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from .convert import _to_pandas

_IDENT = re.compile(r"`([^`]+)`|\b([A-Za-z_][A-Za-z0-9_]*)\b")


def _referenced_columns(expr: str, names) -> set[str]:
    """Column names that appear in a pandas expression (a superset is fine: they are only read)."""
    names = set(names)
    found = set()
    for quoted, bare in _IDENT.findall(expr):
        n = quoted or bare
        if n in names:
            found.add(n)
    return found


def _check_string_comparisons(expr: str, schema: pa.Schema) -> None:
    """Refuse a string column compared with a bare number (``specobjid == 299492975510054912``): pandas compares
    them as unequal on every row, so the filter would silently keep nothing (or everything, with ``!=``)."""
    strings = {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
    number = r"[-+]?\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?"
    for m in re.finditer(rf"\b([A-Za-z_]\w*)\s*(==|!=|<=|>=|<|>)\s*({number})(?![\w.'\"])|"
                         rf"(?<![\w.'\"])({number})\s*(==|!=|<=|>=|<|>)\s*([A-Za-z_]\w*)\b", expr):
        col, value = (m.group(1), m.group(3)) if m.group(1) else (m.group(6), m.group(4))
        if col in strings:
            raise ConfigError(f"{col} is a string column, compared with the number {value} in {expr!r}: quote the "
                              f"value, e.g. {col} == '{value}'")


def check_column_list(columns) -> tuple:
    """Column names from ``"a,b"`` or a list, stripped; a :class:`ConfigError` when none is named or one twice."""
    if isinstance(columns, str):
        cols = tuple(columns.split(","))
    else:
        try:  # a list, a tuple, a schema's names, a pandas Index ...
            cols = tuple(columns)
        except TypeError:
            raise ConfigError(f"columns must be names, comma-separated ('source_id,ra,dec') or in a list, got "
                              f"{columns!r}") from None
    cols = tuple(str(c).strip() for c in cols if str(c).strip())
    if not cols:
        raise ConfigError(f"no column names in {columns!r}; give a comma-separated list, e.g. source_id,ra,dec,w1_mag")
    twice = sorted({c for c in cols if cols.count(c) > 1})
    if twice:
        raise ConfigError(f"columns named more than once: {', '.join(twice)}; name each column once")
    return cols


def _flat_frame(table: pa.Table):
    """pandas frame of the scalar columns (list columns cannot appear in expressions)."""
    drop = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
    return _to_pandas(table.drop_columns(drop))


def _eval_filter(df, expr: str) -> np.ndarray:
    """The boolean row mask of a filter expression (pandas ``eval`` syntax; missing values are False).

    Evaluated with pandas' python engine (the same results whether numexpr is installed or not). An integer
    literal in a bitwise test on an integer column (``"(flags & 1) > 0"``) is given to pandas as a column of
    that value (:func:`_bitwise_literals`): pandas refuses ``&``, ``|`` between a column and a scalar
    ("cannot evaluate scalar only bool ops").
    """
    # a lone '=' (SQL/ADQL equality) is an assignment in pandas: say so instead of pandas' message
    hint = ("; equality is '==' (e.g. \"survey == 'desi'\"), or use --sql (sql() in Python) for SQL"
            if re.search(r"(?<![=!<>])=(?!=)", expr) else "")
    rewritten, literals = _bitwise_literals(expr, len(df))
    try:
        res = df.eval(rewritten, engine="python", resolvers=[literals] if literals else [])
    except Exception as exc:
        if "scalar only bool ops" in str(exc):  # e.g. 'flags & 2 == 2': '&' binds like 'and' in pandas
            hint += "; '&' and '|' bind like 'and'/'or' here, so bit tests need parentheses: '(flags & 2) == 2'"
        raise ConfigError(f"cannot evaluate the filter {expr!r}: {exc}{hint}; columns: {', '.join(df.columns)}") from exc
    kind = getattr(getattr(res, "dtype", None), "kind", None)
    if kind in ("i", "u"):  # a bare bit test, 'flags & 4': nonzero
        res, kind = res != 0, "b"
    elif kind == "O":  # booleans with missing values (e.g. from a string method) are a condition too
        import pandas as pd

        kind = "b" if pd.api.types.infer_dtype(res, skipna=True) in ("boolean", "empty") else "O"
    elif kind is None and isinstance(res, (bool, np.bool_)):
        kind = "b"
    if kind != "b":
        what = f" (its values are {res.dtype})" if hasattr(res, "dtype") else ""
        raise ConfigError(f"the filter {expr!r} is not a true/false condition{what}: compare it, e.g. 'z < 0.1', "
                          f"or test bits of an integer column, e.g. '(flags & 1) > 0'{hint}")
    try:
        return np.asarray(res.fillna(False) if hasattr(res, "fillna") else res, dtype=bool).reshape(len(df))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the filter {expr!r} is not a true/false condition (e.g. 'z < 0.1'){hint}") from exc


def _filter_frame(df, expr: str):
    """The rows of a pandas frame (one lsdb partition) that pass a filter expression (:func:`_eval_filter`).

    The expression is evaluated on a plain pandas view of the partition (nested-pandas' own ``eval`` adds
    nested-column syntax and a deprecation warning per call; catalog filters reference scalar columns).
    """
    import pandas as pd

    return df[_eval_filter(pd.DataFrame(df, copy=False), expr)]


#: prefix of the names :func:`_bitwise_literals` gives integer literals (not a catalog column name)
_LITERAL_NAME = "_catalogpred_int_"


def _bitwise_literals(expr: str, n_rows: int) -> tuple[str, dict]:
    """``expr`` with the integer literals of bitwise ``&``/``|`` tests (``flags & 1``) replaced by names, and
    those names' values as arrays of ``n_rows`` (so that pandas sees two columns); ``(expr, {})`` when there
    are none.

    pandas reads ``&``/``|`` as ``and``/``or`` (their precedence, elementwise on columns) and refuses a scalar
    operand. Only operands of such a test that are integer literals, beside no true/false operand, are
    replaced: ``"(flags & 4) == 0"``, not ``"z < 1 & flags == 0"`` (already two conditions).
    """
    import ast
    import io
    import tokenize

    if "&" not in expr and "|" not in expr:
        return expr, {}
    quoted: dict[str, str] = {}

    def placeholder(m) -> str:  # `quoted names` are not Python: a name for each, put back after
        quoted[f"_catalogpred_q{len(quoted)}_"] = m.group(0)
        return f"_catalogpred_q{len(quoted) - 1}_"

    try:
        words = {"&": "and", "|": "or"}
        toks = [(tokenize.NAME, words[t.string]) if t.type == tokenize.OP and t.string in words else (t.type, t.string)
                for t in tokenize.generate_tokens(io.StringIO(re.sub(r"`[^`]*`", placeholder, expr)).readline)]
        tree = ast.parse(tokenize.untokenize(toks).strip(), mode="eval")
    except (SyntaxError, tokenize.TokenError, ValueError):
        return expr, {}  # pandas says what is wrong with it
    boolean = (ast.Compare, ast.BoolOp)
    literals: dict[str, np.ndarray] = {}

    class Replace(ast.NodeTransformer):
        def visit_BoolOp(self, node):
            self.generic_visit(node)
            if any(isinstance(v, boolean) or (isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.Not))
                   or (isinstance(v, ast.Constant) and isinstance(v.value, bool)) for v in node.values):
                return node
            values = []
            for v in node.values:
                if isinstance(v, ast.Constant) and type(v.value) is int and -2 ** 63 <= v.value < 2 ** 63:
                    name = f"{_LITERAL_NAME}{len(literals)}"
                    literals[name] = np.full(n_rows, v.value, dtype=np.int64)
                    v = ast.Name(id=name, ctx=ast.Load())
                values.append(v)
            node.values = values
            return node

    tree = Replace().visit(tree)
    if not literals:
        return expr, {}
    out = ast.unparse(tree)
    for name, text in quoted.items():
        out = out.replace(name, text)
    return out, literals
