"""valora_jax: a LLaVA-style LMM with segmented multi-LoRA layers, adapter pool, merging and generation."""

from valora_jax.adapters import Adapter, AdapterPool, PoolFull, TaskHead, make_adapter, random_adapter
from valora_jax.checkpoint import load_adapter, load_model, save_adapter, save_model
from valora_jax.config import (ALL_TARGETS, DECODER_TARGETS, PRESETS, LMMConfig, LoraConfig, TextConfig,
                               VisionConfig, llava_1_5_7b, llava_1_5_13b, tiny)
from valora_jax.hf_model import hf_config, import_hf, is_hf_checkpoint, load_hf_model
from valora_jax.hf_peft import import_peft, read_peft
from valora_jax.hf_tokenizer import HFTokenizer, load_tokenizer
from valora_jax.kv_cache import OutOfPages, PageAllocator, init_pages
from valora_jax.lora import BACKENDS, MODES, Linear, LoraContext
from valora_jax.request import Completion, Request, RequestState
from valora_jax.model import LMM, count_params, init_model
from valora_jax.decoder import Block
from valora_jax.blocks import RowSpec, bucket, pack_block
from valora_jax.runtime import ModelRunner, frozen_heap, resolve_backends, use_serving_xla_flags
from valora_jax.tokenizer import ByteTokenizer
