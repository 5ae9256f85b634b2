"""The demo's students before training: the teacher cut down, on its own tokenizer or another.

Both start from the teacher, which is what makes 40 CPU steps enough to see anything:

- ``build_student`` keeps every n-th decoder layer (as DistilBERT did), embeddings and
  head included, on the teacher's tokenizer.
- ``build_cross_student`` takes that student to another real tokenizer. Only the
  embeddings (and an untied head) change: a student token whose bytes spell a teacher
  token gets that token's row, any other token the mean of the rows of the teacher's
  tokenization of its text (the initialisation of vocabulary-transfer methods such as
  FOCUS/WECHSEL, in its simplest form); a token whose bytes are no whole character gets
  the mean row. The student's eos (the token its completions end with in aligned
  training) starts from the teacher's eos. The cross-tokenizer students then differ
  from the same-tokenizer ones in the tokenizer only, not in what the layers know.
"""

from __future__ import annotations

from pathlib import Path


def build_student(teacher: Path | str, out_dir: Path, every: int) -> Path:
    """The teacher with every ``every``-th decoder layer kept, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    keep = list(range(0, model.config.num_hidden_layers, every))
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out_dir)
    return out_dir


def build_cross_student(student: Path, tokenizer_dir: Path, out_dir: Path) -> Path:
    """``student`` (on the teacher's tokenizer) moved to the tokenizer in ``tokenizer_dir``:
    new embedding rows as the module docstring says, everything else unchanged."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillcache.trainer.token_alignment import TokenBytes

    teacher_tok = AutoTokenizer.from_pretrained(student)
    student_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    pieces = TokenBytes(student_tok).table
    teacher_ids = {piece: i for i, piece in enumerate(TokenBytes(teacher_tok).table) if piece}
    texts = [piece.decode("utf-8", errors="ignore") for piece in pieces]
    spelled = teacher_tok(texts, add_special_tokens=False)["input_ids"]
    sources: list[list[int]] = []
    for piece, ids in zip(pieces, spelled, strict=True):
        same = teacher_ids.get(piece)
        sources.append([same] if same is not None else ids)
    sources[student_tok.eos_token_id] = [teacher_tok.eos_token_id]

    def transferred(rows: torch.Tensor) -> torch.Tensor:
        out = rows.mean(0).repeat(len(sources), 1)
        for index, ids in enumerate(sources):
            if ids:
                out[index] = rows[np.asarray(ids)].mean(0)
        return out

    tied = model.config.tie_word_embeddings
    embeddings = transferred(model.get_input_embeddings().weight.detach())
    head = None if tied else transferred(model.get_output_embeddings().weight.detach())
    model.resize_token_embeddings(len(sources), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embeddings)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    for config in (model.config, model.generation_config):
        config.eos_token_id = student_tok.eos_token_id
        config.bos_token_id = student_tok.bos_token_id
        config.pad_token_id = student_tok.pad_token_id
    model.save_pretrained(out_dir)
    student_tok.save_pretrained(out_dir)
    return out_dir
