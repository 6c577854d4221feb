"""One test per private peft/torch/transformers assumption made in trady_peft/compat.py.

If one of these fails after an upgrade, the helper it names in compat.py needs revisiting.
"""

from __future__ import annotations

import inspect

import peft.peft_model
import peft.utils.save_and_load
import pytest
import safetensors
import safetensors.torch
import torch
from peft import PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn
from trady_peft import _patches, compat
from trady_peft.files.atomic import atomic_save_file


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, init_weights=False))
    model.base_model.next_period()
    model.save_pretrained(tmp_path)
    return tmp_path


def test_peft_save_pretrained_writes_safetensors_through_peft_model_safe_save_file(tmp_path, monkeypatch):
    # peft 0.21.2: `from safetensors.torch import save_file as safe_save_file` in peft/peft_model.py.
    assert peft.peft_model.safe_save_file is atomic_save_file  # installed by `import trady_peft`
    calls = []
    monkeypatch.setattr(peft.peft_model, "safe_save_file", lambda t, f, metadata=None: calls.append(f))
    get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2)).save_pretrained(tmp_path)
    assert [str(f) for f in calls] == [str(tmp_path / "adapter_model.safetensors")]


def test_load_peft_weights_reads_the_resolved_file_through_save_and_load_safe_load_file(adapter_dir, monkeypatch):
    # peft 0.21.2: `from safetensors.torch import load_file as safe_load_file` in peft/utils/save_and_load.py.
    assert getattr(peft.utils.save_and_load.safe_load_file, compat._MARK, False)
    calls = []
    real = peft.utils.save_and_load.safe_load_file
    monkeypatch.setattr(peft.utils.save_and_load, "safe_load_file", lambda f, **kw: calls.append(f) or real(f, **kw))
    peft.utils.save_and_load.load_peft_weights(str(adapter_dir), device="cpu")
    assert [str(f) for f in calls] == [str(adapter_dir / "adapter_model.safetensors")]


def test_from_pretrained_loads_weights_through_peft_model_load_adapter(adapter_dir, monkeypatch):
    # peft 0.21.2: PeftModel.from_pretrained calls model.load_adapter(model_id, adapter_name, ...).
    assert getattr(PeftModel.load_adapter, compat._MARK, False)
    calls = []
    real = PeftModel.load_adapter
    monkeypatch.setattr(PeftModel, "load_adapter", lambda self, *a, **kw: calls.append(a[:2]) or real(self, *a, **kw))
    PeftModel.from_pretrained(tiny_cnn(), adapter_dir)
    assert calls == [(adapter_dir, "default")]


def test_trainer_resumes_a_peft_checkpoint_through_load_adapter():
    # transformers 5.24: Trainer._load_from_checkpoint calls
    # model.load_adapter(resume_from_checkpoint, active_adapter, is_trainable=True) for a PeftModel.
    from transformers import Trainer

    source = inspect.getsource(Trainer._load_from_checkpoint)
    assert "model.load_adapter(resume_from_checkpoint, active_adapter, is_trainable=True)" in source


def test_layer_load_hook_sees_its_keys_before_its_buffers_are_filled(adapter_dir, monkeypatch):
    # torch 2.13: load_state_dict calls a module's _load_from_state_dict with the keys under its
    # prefix (peft has inserted the adapter name) before loading its children; also with assign=True.
    import trady_peft.core.layer

    for low_cpu_mem_usage in (False, True):
        seen = []

        def spy(state_dict, prefix, adapters, geometry, seen=seen):
            layer = f"{prefix}trady_indices.default"
            seen.append((prefix, layer in state_dict, list(adapters)))

        monkeypatch.setattr(trady_peft.core.layer, "check_layer_state", spy)
        PeftModel.from_pretrained(tiny_cnn(), adapter_dir, low_cpu_mem_usage=low_cpu_mem_usage)
        assert sorted(p for p, _, _ in seen) == [f"base_model.model.{n}." for n in ("dw", "pw", "stem")]
        assert all(found and adapters == ["default"] for _, found, adapters in seen)


def test_safetensors_raises_safetensor_error_for_a_truncated_file(tmp_path):
    # safetensors 0.8: damaged headers raise `safetensors.SafetensorError` (compat re-raises it naming the path).
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load_file(path)


def test_install_is_idempotent():
    import transformers.trainer

    load_file, load_adapter = peft.utils.save_and_load.safe_load_file, PeftModel.load_adapter
    card, callbacks = PeftModel.create_or_update_model_card, list(transformers.trainer.DEFAULT_CALLBACKS)
    _patches.install()
    assert peft.utils.save_and_load.safe_load_file is load_file and PeftModel.load_adapter is load_adapter
    assert PeftModel.create_or_update_model_card is card and transformers.trainer.DEFAULT_CALLBACKS == callbacks


def test_seq_cls_head_names_lists_the_classifier_heads():
    from trady_peft.compat import SEQ_CLS_HEAD_NAMES

    assert "classifier" in SEQ_CLS_HEAD_NAMES and "score" in SEQ_CLS_HEAD_NAMES


def test_in_backward_is_true_only_inside_a_backward_pass():
    import torch

    from trady_peft.compat import in_backward

    seen = []
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda g: seen.append(in_backward()))
    (x * 2).sum().backward()
    assert seen == [True] and not in_backward()


def test_a_callback_can_move_itself_before_the_integrations():
    from transformers.trainer_callback import CallbackHandler, TrainerCallback

    from trady_peft.compat import move_callback_first

    class Integration(TrainerCallback):
        pass

    class Mover(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            self.moved = move_callback_first(self)

    mover = Mover()
    handler = CallbackHandler([Integration(), mover], None, None, None, None)
    handler.on_init_end(None, None, None)
    assert mover.moved and handler.callbacks[0] is mover


def test_every_trainer_gets_the_period_watchdog():
    import transformers.trainer

    from trady_peft.callback import PeriodWatchdog

    assert PeriodWatchdog in transformers.trainer.DEFAULT_CALLBACKS


def test_tensor_leaves_finds_nested_tensors():
    import torch

    from trady_peft.compat import tensor_leaves

    a, b, c = torch.zeros(1), torch.ones(2), torch.ones(3)
    assert [t.shape for t in tensor_leaves(((a, [b]), {"x": {"y": c}, "n": 3}))] == [a.shape, b.shape, c.shape]


def test_tree_flatten_asks_is_leaf_first_and_tree_unflatten_rebuilds_plain_containers():
    from collections import OrderedDict, namedtuple

    from trady_peft.compat import tree_flatten, tree_unflatten

    pair = namedtuple("pair", "a b")(1, 2)
    tree = ([pair, OrderedDict(k=3)], {"z": (4,), "a": None})
    leaves, spec = tree_flatten(tree, is_leaf=lambda x: type(x) not in (tuple, list, dict))
    assert leaves == [pair, OrderedDict(k=3), 4, None]  # namedtuple and OrderedDict kept whole
    rebuilt = tree_unflatten(["p", "o", 5, 6], spec)
    assert rebuilt == (["p", "o"], {"z": (5,), "a": 6}) and list(rebuilt[1]) == ["z", "a"]
    assert type(rebuilt) is tuple and type(rebuilt[0]) is list and type(rebuilt[1]) is dict


# ------------------------------------------- private APIs used outside compat.py, one test each
def test_peft_type_enum_accepts_the_trady_member():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    assert PeftType.TRADY in list(PeftType) and PeftType("TRADY") is PeftType["TRADY"] is PeftType.TRADY
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TRADY] == "trady_"


def test_buffer_dict_lives_where_layer_py_imports_it():
    from peft.tuners._buffer_dict import BufferDict

    d = BufferDict(persistent=True)
    d["a"] = torch.zeros(2)
    assert "a" in d and list(d.keys()) == ["a"]


def test_aten_convolution_backward_takes_an_expanded_input_for_the_input_gradient():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    g = torch.randn(1, 3, 3, 3)
    g_in, _, _ = torch.ops.aten.convolution_backward(
        g, x.new_empty(1).expand(x.shape), w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
    )
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.conv2d(xr, w).backward(g)
    torch.testing.assert_close(g_in, xr.grad)


def test_conv_reversed_padding_attribute_gives_f_pad_amounts():
    conv = torch.nn.Conv2d(2, 2, (3, 4), padding="same", padding_mode="reflect")
    assert tuple(conv._reversed_padding_repeated_twice) == (1, 2, 1, 1)


def test_peft_state_dict_hooks_round_trip_the_selection_state_key():
    from peft.tuners.tuners_utils import BaseTuner

    assert callable(BaseTuner._get_adapter_state_dict) and callable(BaseTuner._remap_adapter_state_dict_for_load)
    key = BaseTuner._remove_adapter_name_from_key("base_model.trady_state.default", "default")
    assert key == "base_model.trady_state"


def test_class_swaps_keep_parameters_and_state_dict_keys():
    from trady_peft.memory.frozen_path import apply_memory_saving, restore

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU())
    model.requires_grad_(False)
    keys = list(model.state_dict())
    assert apply_memory_saving(model) and list(model.state_dict()) == keys
    assert restore(model) == 3 and type(model[0]) is torch.nn.Conv2d


def test_deepspeed_marks_zero_parameters_as_compat_expects(monkeypatch):
    """deepspeed 0.19.8: ZeRO-3 parameters carry ``ds_id``/``ds_numel``; ZeRO-1/2 ones ``_hp_mapping``."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    plain = torch.nn.Parameter(torch.zeros(3))
    assert not compat.is_zero3_param(plain) and not compat.has_zero_master(plain)
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29519", RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for stage in (2, 3):  # one process group: DeepSpeed keeps its first one
            model = torch.nn.Linear(4, 8)
            config = {
                "train_batch_size": 1,
                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True,
            }
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            weight = model.weight
            assert compat.has_zero_master(weight), stage
            assert compat.is_zero3_param(weight) == (stage == 3)
            if stage == 3:
                assert weight.ds_numel == 32 and weight.numel() == 0  # what bank_numel relies on
    finally:
        dist.destroy_process_group()


def test_transformers_checkpoint_layers_carry_the_flag_and_partial_read_by_reentrant_checkpointing():
    import warnings

    from tests.tiny_models import tiny_llama
    from trady_peft.compat import reentrant_checkpointing

    model = tiny_llama().train()
    layer = model.model.layers[0]
    assert not reentrant_checkpointing(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        assert reentrant_checkpointing(layer)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert not reentrant_checkpointing(layer)


def test_a_forward_hook_moved_last_runs_after_hooks_registered_later():
    from trady_peft.compat import run_forward_hook_last

    module, calls = torch.nn.Identity(), []
    first = module.register_forward_hook(lambda *a: calls.append("first"))
    module.register_forward_hook(lambda *a: calls.append("second"))
    run_forward_hook_last(module, first)
    module(torch.zeros(1))
    assert calls == ["second", "first"]


def test_the_require_grad_hooks_of_transformers_and_peft_are_recognised_by_name():
    import warnings

    from tests.tiny_models import tiny_llama
    from trady_peft.compat import has_require_grad_hook

    model = tiny_llama()
    embedding = model.get_input_embeddings()
    assert not has_require_grad_hook(embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.enable_input_require_grads()  # transformers' make_inputs_require_grads
    assert has_require_grad_hook(embedding)
    model.disable_input_require_grads()
    assert not has_require_grad_hook(embedding)
    embedding.register_forward_hook(lambda *a: None)  # a user's own hook
    assert not has_require_grad_hook(embedding)


def test_tensor_version_counts_in_place_changes():
    weight = torch.nn.Parameter(torch.zeros(4))
    before = compat.tensor_version(weight)
    view = weight.narrow(0, 1, 2)
    with torch.no_grad():
        weight.add_(1.0)
    assert compat.tensor_version(weight) > before
    assert compat.tensor_version(view) == compat.tensor_version(weight)  # views share the counter


def test_loss_function_of_returns_what_the_property_returns():
    # transformers 5.24: PreTrainedModel.loss_function reads _loss_function, then loss_type, then the default.
    from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama

    for model in (tiny_llama(), tiny_gpt2(), tiny_bert()):
        assert compat.loss_function_of(model) is model.loss_function
    model = tiny_llama()
    model.loss_function = custom = lambda *a, **k: None  # noqa: E731
    assert compat.loss_function_of(model) is custom


def test_module_calls_on_stack_counts_the_running_calls_of_a_module():
    # torch 2.13: Module.__call__ runs Module._call_impl(self, ...), which runs the hooks and forward.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(compat.module_calls_on_stack(model)))
    model.register_forward_pre_hook(lambda m, args: seen.append(compat.module_calls_on_stack(model)))
    model(torch.zeros(1, 2))
    assert seen == [1, 1] and compat.module_calls_on_stack(model) == 0


def test_resize_parameter_drops_the_gradient_accumulator_a_live_graph_keeps():
    parameter = torch.nn.Parameter(torch.zeros(10))
    old_loss = parameter.split([4, 6])[0].sum()
    old_loss.backward()  # old_loss stays referenced, as the last step's loss does in a training loop
    compat.resize_parameter(parameter, torch.ones(7))
    assert parameter.grad is None and parameter.dtype == torch.float32
    loss = parameter.split([3, 4])[1].sum()
    loss.backward()
    assert parameter.grad.shape == (7,) and parameter.grad.tolist() == [0.0] * 3 + [1.0] * 4
    with torch.no_grad():  # the plain assignment keeps the stale accumulator: the reason for the helper
        parameter.data = torch.zeros(5)
    parameter.grad = None
    with pytest.raises(RuntimeError, match="invalid gradient"):
        parameter.split([2, 3])[0].sum().backward()
