"""How an eval row's columns become model texts, per format rule and task type (hub-layouts §2-§3).

Two layouts exist: MMEB-eval (v1) rows carry joined texts (``qry_text`` already holds the instruction), and
MMEB_Test_Instruct rows (VLM2Vec v2's image eval) keep ``qry_inst`` / ``tgt_inst`` apart from ``qry_text`` /
``tgt_text``. Rule ``mmeb-v2-instruct`` joins the columns exactly as VLM2Vec v2 does; the v1 rules normalise v1
texts, and join instruct columns the way v1 rows were written (instruction, a space, the text).

The image token is written as the model's placeholder (``<|image_1|>``); the embedder swaps in its image block.
"""

from __future__ import annotations

from collections.abc import Sequence

from coma.data.formats import EvalQuery
from coma.eval.registry import DatasetSpec, FormatRule, apply_format_rule

PLACEHOLDER = "<|image_1|>"
TASK_TYPES = ("cls", "qa", "i2t", "t2i", "i2i_vg")


def task_type(spec: DatasetSpec) -> str:
    """VLM2Vec v2's dataset family of an MMEB dataset, from its meta-task and modalities.

    Text candidates: classification (``cls``), VQA (``qa``) or image-to-text retrieval (``i2t``); a text query:
    ``t2i`` (VisDial, VisualNews_t2i, MSCOCO_t2i, WebQA, EDIS, Wiki-SS-NQ); the rest (CIRR, NIGHTS, FashionIQ, OVEN
    and grounding) is ``i2i_vg``.
    """
    if spec.candidate_modality == "text":
        return {"classification": "cls", "vqa": "qa"}.get(spec.meta_task, "i2t")
    if spec.query_modality == "text":
        return "t2i"
    return "i2i_vg"


def _process(inst: str, text: str, token: str) -> str:
    """VLM2Vec v2's ``process_input_text``: image token, a space, the instruction, and the text after a space."""
    return f"{token} {inst}" + (f" {text}" if text else "")


def _v2_close(text: str, newline: bool = True) -> str:
    return text.replace(" \n", "\n") + ("\n" if newline else "")


def v2_query(kind: str, inst: str, text: str, dataset: str, token: str = PLACEHOLDER) -> str:
    """The query text under ``mmeb-v2-instruct`` (hub-layouts §3)."""
    if kind == "t2i":
        return inst.replace(PLACEHOLDER, token) + " " + text + "\n" + ("\n" if dataset == "VisDial" else "")
    if kind in ("qa", "i2i_vg"):
        inst = "\n" + inst.replace(PLACEHOLDER, "").strip()
    else:
        inst = inst.replace(PLACEHOLDER, "")
    return _v2_close(_process(inst, text, token))


def v2_candidate(kind: str, inst: str, text: str, token: str = PLACEHOLDER) -> str:
    """A candidate text under ``mmeb-v2-instruct``: t2i and i2i/VG targets join instruction and caption; text
    candidates (cls, qa, i2t) are used as they are."""
    if kind not in ("t2i", "i2i_vg"):
        return text
    inst = inst.replace(PLACEHOLDER, "")
    if text.strip():
        return _v2_close(_process(inst, text, token))
    return _v2_close(_process(inst, "", token), newline=kind == "t2i")


def _v1_join(inst: str, text: str) -> str:
    return inst + (" " + text if text else "") if inst else text


def query_texts(query: EvalQuery, spec: DatasetSpec, rule: FormatRule) -> tuple[str, list[str]]:
    """``(query text, candidate texts)`` of one row under ``rule``."""
    if rule.instruct:
        if query.qry_inst is None:
            raise ValueError(
                f"format rule {rule.version!r} needs the MMEB_Test_Instruct columns (qry_inst, tgt_inst); "
                f"{query.source} has MMEB-eval (v1) rows: use mmeb-v1"
            )
        kind = task_type(spec)
        inst = _candidate_insts(query)
        return (
            v2_query(kind, query.qry_inst, query.qry_text, spec.name),
            [v2_candidate(kind, i, t) for i, t in zip(inst, query.tgt_text, strict=True)],
        )
    if query.qry_inst is None:
        return apply_format_rule(query.qry_text, rule), [apply_format_rule(t, rule) for t in query.tgt_text]
    inst = _candidate_insts(query)
    return (
        apply_format_rule(_v1_join(query.qry_inst, query.qry_text), rule),
        [apply_format_rule(_v1_join(i, t), rule) for i, t in zip(inst, query.tgt_text, strict=True)],
    )


def _candidate_insts(query: EvalQuery) -> Sequence[str]:
    return query.tgt_inst if query.tgt_inst is not None else [""] * len(query.tgt_text)
