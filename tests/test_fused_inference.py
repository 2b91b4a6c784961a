""" The fused oneDNN path of CPU inference: taken only where it may be, equal to the torch ops, and safe to lose."""
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from timm.models.pvt_v2 import MlpWithDepthwiseConv as TimmMlpWithDepthwiseConv

from flatten_timm.layers import Linear, Mlp, MlpWithDepthwiseConv, cpu_fusion_enabled, fused_conv2d, fused_linear
from flatten_timm.layers import fused_inference
from flatten_timm.layers.grid_tokens import tokens_to_map
from test_models import TINY

pytestmark = pytest.mark.skipif(not fused_inference._state['available'], reason='no oneDNN in this build of torch')


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach each oneDNN primitive."""
    counts = {name: 0 for name in fused_inference._ops}
    for name, op in list(fused_inference._ops.items()):
        def counted(*args, _op=op, _name=name):
            counts[_name] += 1
            return _op(*args)
        monkeypatch.setitem(fused_inference._ops, name, counted)
    return counts


def test_taken_only_in_float32_cpu_inference_without_autocast():
    x = torch.randn(2, 3)
    assert cpu_fusion_enabled(x) is False  # autograd is on
    with torch.no_grad():
        assert cpu_fusion_enabled(x)
        assert not cpu_fusion_enabled(x.bfloat16())
        assert not cpu_fusion_enabled(x[:0])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not cpu_fusion_enabled(x)
        previous = fused_inference.set_cpu_fusion(False)
        try:
            assert not cpu_fusion_enabled(x)
        finally:
            fused_inference.set_cpu_fusion(previous)
    with torch.inference_mode():
        assert cpu_fusion_enabled(x)


@pytest.mark.parametrize('act', [dict(gelu='none'), dict(gelu='tanh'), dict(relu=True), {}])
def test_linear_equals_the_torch_ops(act, calls):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 37, 24), torch.randn(40, 24), torch.randn(40)
    expected = F.linear(x, weight, bias)
    expected = (F.gelu(expected, approximate=act['gelu']) if 'gelu' in act
                else F.relu(expected) if act else expected)
    with torch.no_grad():
        out = fused_linear(x, weight, bias, **act)
        strided = fused_linear(torch.cat([x, x], -1)[..., 24:], weight, None, **act)  # a column slice, no bias
    assert calls['linear'] == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, fused_linear(x, weight, None, **act), rtol=1e-5, atol=1e-5)


def test_strided_weights_and_biases_are_read_right(calls):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    weight, bias = torch.randn(16, 24).t(), torch.randn(48)[::2]  # neither is dense
    conv_weight, conv_bias = torch.randn(16, 1, 3, 6)[..., ::2], torch.randn(32)[::2]
    maps = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_conv2d(maps, conv_weight, conv_bias, (1, 1), groups=16),
                                   F.conv2d(maps, conv_weight, conv_bias, padding=1, groups=16), rtol=1e-5, atol=1e-5)
    assert calls['linear'] == 1 and calls['conv2d'] == 1


def test_depthwise_conv_gelu_equals_the_torch_ops(calls):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 13).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 1, 3, 3), torch.randn(16)
    with torch.no_grad():
        out = fused_conv2d(x, weight, bias, (1, 1), groups=16, gelu='none')
    assert calls['conv2d'] == 1
    torch.testing.assert_close(out, F.gelu(F.conv2d(x, weight, bias, padding=1, groups=16)), rtol=1e-5, atol=1e-5)


def test_modules_keep_timm_state_dicts_and_outputs(calls):
    torch.manual_seed(0)
    x = torch.randn(2, 6 * 5, 16)
    pairs = [(TimmMlp(16, 64), Mlp(16, 64)), (nn.Linear(16, 8), Linear(16, 8))]
    for extra_relu in (False, True):
        pairs.append((TimmMlpWithDepthwiseConv(16, 64, extra_relu=extra_relu),
                      MlpWithDepthwiseConv(16, 64, extra_relu=extra_relu)))
    for theirs, ours in pairs:
        ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
        args = (x, (6, 5)) if isinstance(ours, MlpWithDepthwiseConv) else (x,)
        with torch.no_grad():
            torch.testing.assert_close(ours(*args), theirs(*args), rtol=1e-5, atol=1e-5)
        # with autograd the plain ops run, and gradients flow
        ours(*args).sum().backward()
        assert ours.fc1.weight.grad is not None if hasattr(ours, 'fc1') else ours.weight.grad is not None
    assert calls['linear'] == 2 + 1 + 2 * 2 and calls['conv2d'] == 2


def test_mlps_run_large_inputs_in_chunks(monkeypatch, calls):
    """Inputs whose hidden activation exceeds the chunk budget run in chunks, with the same output, eager and
    compiled: PVTv2's in chunks of whole images, the plain MLP too, or in chunks of tokens that cut across images
    where one image is over the split budget."""
    torch.manual_seed(0)
    x = torch.randn(5, 6 * 5, 16)
    # 5 images of 30 tokens x 64 hidden features: two images fit the budget, three do not (chunks of 2, 2 and 1
    # images); with images over the split size, the plain MLP's 150 tokens run in chunks of 64, 64 and 22, and
    # PVTv2's (whose conv needs whole maps) in chunks of one image
    image = 30 * 64 * 4
    whole_images, tokens = (3 * image - 1, image), (64 * 64 * 4, image - 1)
    for theirs, ours, (budget, split_above), chunks in (
            (TimmMlp(16, 64), Mlp(16, 64), whole_images, 3), (TimmMlp(16, 64), Mlp(16, 64), tokens, 3),
            (TimmMlpWithDepthwiseConv(16, 64), MlpWithDepthwiseConv(16, 64), whole_images, 3),
            (TimmMlpWithDepthwiseConv(16, 64), MlpWithDepthwiseConv(16, 64), (image - 1, image - 1), 5)):
        ours.load_state_dict(theirs.state_dict())
        args = (x, (6, 5)) if isinstance(ours, MlpWithDepthwiseConv) else (x,)
        monkeypatch.setattr(fused_inference, '_MLP_CHUNK_BYTES', budget)
        monkeypatch.setattr(fused_inference, '_MLP_SPLIT_IMAGE_BYTES', split_above)
        before = calls['linear']
        with torch.no_grad():
            torch.testing.assert_close(ours(*args), theirs(*args), rtol=1e-5, atol=1e-5)
        assert calls['linear'] - before == 2 * chunks
        # and compiled: the MLP is one op of the graph, which runs the chunks inside
        torch._dynamo.reset()
        before = calls['linear']
        with torch.no_grad():
            compiled = torch.compile(ours, fullgraph=True, backend='aot_eager')(*args)
        torch.testing.assert_close(compiled, theirs(*args), rtol=1e-5, atol=1e-5)
        assert calls['linear'] - before == 2 * chunks
    assert calls['conv2d'] == 2 * (3 + 5)
    torch._dynamo.reset()


def test_train_mode_dropout_keeps_the_plain_path(calls):
    mlp = Mlp(16, 32, drop=0.5).train()
    with torch.no_grad():
        out = mlp(torch.ones(4, 16))
    assert calls['linear'] == 0 and (out != out.new_zeros(())).any()


@pytest.mark.parametrize('name', sorted(TINY))
def test_models_equal_with_and_without_fusion(name, calls):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    x = torch.randn(2, 3, 64, 96)
    previous = fused_inference.set_cpu_fusion(False)
    try:
        with torch.no_grad():
            plain = model(x)
    finally:
        fused_inference.set_cpu_fusion(previous)
    assert sum(calls.values()) == 0
    with torch.no_grad():
        fused = model(x)
    assert calls['linear'] > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _compile_recording_ops(model, seen):
    """torch.compile(model, fullgraph) with a backend that notes the ops of the graph, then runs it eagerly."""
    def backend(graph_module, example_inputs):
        seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == 'call_function')
        return graph_module.forward
    return torch.compile(model, fullgraph=True, backend=backend)


@pytest.mark.parametrize('name', sorted(TINY))
def test_compiled_inference_runs_the_primitives_as_custom_ops(name, calls):
    """Under torch.compile the primitives stay in the graph as opaque custom ops (inductor cannot lower oneDNN's
    ops for weights that are not frozen); inductor's freezing, which packs the weights and fuses by itself,
    gets the plain ops."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        seen = set()
        compiled = _compile_recording_ops(model, seen)(x)
        assert 'flatten_timm.onednn_linear.default' in seen
        # each MLP is one op, which runs its chunks inside
        assert {'flatten_timm.onednn_mlp.default', 'flatten_timm.onednn_mlp_dwconv.default'} & seen, seen
        assert not any(op.startswith('mkldnn.') for op in seen), seen
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        seen.clear()
        with torch._inductor.config.patch(freezing=True):
            frozen = _compile_recording_ops(model, seen)(x)
        assert not any(op.startswith(('flatten_timm.', 'mkldnn.')) for op in seen), seen
        torch.testing.assert_close(frozen, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_custom_ops_declare_the_real_shapes_and_strides():
    x = torch.randn(2, 10, 24)[:, :, :16]  # strided, as the chunks of a fused projection are
    weight, bias = torch.randn(8, 16), torch.randn(8)
    torch.library.opcheck(fused_inference._compiled_linear, (x, weight, bias, 'gelu', 'tanh'))
    torch.library.opcheck(fused_inference._compiled_linear, (x, weight, None, 'none', ''))
    tokens_as_map = torch.randn(2, 20, 16).transpose(1, 2).view(2, 16, 4, 5)
    # a batch of one viewed so has a batch stride of C: channels_last memory that oneDNN took for NCHW
    one_as_map = torch.randn(1, 20, 16).transpose(1, 2).view(1, 16, 4, 5)
    for image in (tokens_as_map, one_as_map, torch.randn(2, 16, 4, 5)):
        torch.library.opcheck(fused_inference._compiled_conv2d,
                              (image, torch.randn(16, 1, 3, 3), torch.randn(16), [1, 1], 16, 'gelu', 'none'))
    tokens = torch.randn(3, 20, 16)
    torch.library.opcheck(fused_inference._compiled_mlp,
                          (tokens, torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), None, 'none'))
    torch.library.opcheck(fused_inference._compiled_mlp_dwconv,
                          (tokens, 4, 5, torch.randn(32, 16), torch.randn(32), True, torch.randn(32, 1, 3, 3),
                           torch.randn(32), [1, 1], torch.randn(16, 32), torch.randn(16), 'tanh'))


def test_a_failing_primitive_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError('could not create a primitive descriptor')
    monkeypatch.setitem(fused_inference._ops, 'linear', broken)
    monkeypatch.setitem(fused_inference._state, 'available', True)
    x, weight = torch.randn(3, 8), torch.randn(4, 8)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match='oneDNN fused CPU inference failed'):
            out = fused_linear(x, weight)
        torch.testing.assert_close(out, F.linear(x, weight))
        assert not fused_inference._state['available']
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter('always')
            fused_linear(x, weight)
    assert not later  # one warning, then the torch ops quietly


def test_environment_variable_turns_it_off():
    code = ('import torch; from flatten_timm.layers import fused_inference as f; '
            'print(f.cpu_fusion_enabled(torch.ones(1)))')
    out = subprocess.run([sys.executable, '-c', f'import torch; torch.set_grad_enabled(False); {code}'],
                         env={**os.environ, 'FLATTEN_CPU_FUSION': '0'},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'


@pytest.mark.parametrize('batch', [1, 3])
def test_token_maps_are_channels_last_views_at_any_batch(batch):
    """oneDNN picks its layout from the strides: a map of one image must look channels_last too, or its
    depthwise conv runs as NCHW after a reorder (4-10x slower here)."""
    tokens = torch.randn(batch, 4 * 5, 16)
    grid = tokens_to_map(tokens, (4, 5))
    assert grid.data_ptr() == tokens.data_ptr() and grid.stride() == (4 * 5 * 16, 1, 5 * 16, 16)
    torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(batch, 16, 4, 5))
    mlp = MlpWithDepthwiseConv(16, 32).eval()
    with torch.no_grad():
        hidden = fused_linear(tokens, mlp.fc1.weight, mlp.fc1.bias)
        out = fused_conv2d(tokens_to_map(hidden, (4, 5)), mlp.dwconv.weight, mlp.dwconv.bias, (1, 1), 32, gelu='none')
    assert out.stride() == (4 * 5 * 32, 1, 5 * 32, 32)
