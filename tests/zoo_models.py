"""The fixed zoo every pass is tested on: diverse timm and torchvision classifiers.

Each entry is (MODEL spec, input size C,H,W). Inputs are as small as each model allows so that
the whole list runs in the default test suite on 2 CPU cores; transformers keep their native size.
``SLOW_ZOO`` holds the heavy models whose structures a smaller entry of ``ZOO`` already covers
(torchvision's ViT-B/16 by a 2-layer ``VisionTransformer``, DenseNet-121 by a 2-layers-per-block
``DenseNet``, timm's Swin-T at 224 by a small Swin of the same class): tests parametrized with ``zoo_params()`` run them under ``-m slow`` only.
"""
import pytest


ZOO: list[tuple[str, tuple[int, int, int]]] = [
    # the CIFAR nets of ToST's paper (fxsparse.nets): plain VGG, deep ResNets, MobileNetV2
    ("fxsparse.nets:vgg16(width=0.25)", (3, 32, 32)),
    ("fxsparse.nets:vgg11(width=0.25)", (3, 32, 32)),
    ("fxsparse.nets:resnet32", (3, 32, 32)),
    ("fxsparse.nets:mobilenetv2(width=0.5)", (3, 32, 32)),
    # plain / residual CNNs
    ("resnet18", (3, 64, 64)),
    ("resnet50", (3, 64, 64)),
    ("tv:resnet18", (3, 64, 64)),
    # torchvision's DenseNet class, 2 layers per block (concatenations everywhere): densenet121's structure
    ("torchvision.models.densenet:DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, "
     "bn_size=2)", (3, 64, 64)),
    ("tv:mobilenet_v2", (3, 64, 64)),
    ("tv:squeezenet1_1", (3, 64, 64)),
    ("resnet26d", (3, 64, 64)),
    ("cspresnet50", (3, 64, 64)),
    ("repvgg_a0", (3, 64, 64)),
    ("dla34", (3, 64, 64)),
    # squeeze-excitation, depthwise, mobile
    ("seresnet18", (3, 64, 64)),
    ("mobilenetv2_100", (3, 64, 64)),
    ("mobilenetv3_small_100", (3, 64, 64)),
    ("tv:mobilenet_v3_small", (3, 64, 64)),
    ("tv:shufflenet_v2_x0_5", (3, 64, 64)),
    ("tv:mnasnet0_5", (3, 64, 64)),
    ("ghostnet_100", (3, 64, 64)),
    ("lcnet_050", (3, 64, 64)),
    # EfficientNet family, incl. TF "same" padding (Conv2dSame leaves), CondConv, MixConv
    ("efficientnet_b0", (3, 64, 64)),
    ("tf_efficientnet_b0", (3, 64, 64)),
    ("efficientnet_cc_b0_4e", (3, 64, 64)),
    ("mixnet_s", (3, 64, 64)),
    ("tv:efficientnet_b0", (3, 64, 64)),
    # RegNet
    ("regnetx_002", (3, 64, 64)),
    ("regnety_002", (3, 64, 64)),
    ("tv:regnet_y_400mf", (3, 64, 64)),
    # normalizer-free (NormFreeBlock leaves, ScaledStdConv2d)
    ("nf_resnet26", (3, 64, 64)),
    ("nf_regnet_b0", (3, 64, 64)),
    # ConvNeXt
    ("convnext_atto", (3, 64, 64)),
    ("tv:convnext_tiny", (3, 64, 64)),
    # transformers and hybrids
    ("vit_tiny_patch16_224", (3, 224, 224)),
    ("deit_tiny_patch16_224", (3, 224, 224)),
    # torchvision's ViT class (nn.MultiheadAttention inside), 2 layers: tv:vit_b_16's structure
    ("torchvision.models.vision_transformer:VisionTransformer(image_size=64, patch_size=16, num_layers=2, "
     "num_heads=4, hidden_dim=64, mlp_dim=128)", (3, 64, 64)),
    # timm's Swin class with windows of 2 at 64x64 (shifted windows, patch merging): Swin-T's structure
    ("swin_tiny_patch4_window7_224(img_size=64, window_size=2, embed_dim=32, num_heads=(1, 2, 4, 8))", (3, 64, 64)),
    ("tv:swin_t", (3, 64, 64)),
    ("mobilevit_xxs", (3, 64, 64)),
    ("edgenext_xx_small", (3, 64, 64)),
    ("poolformer_s12", (3, 64, 64)),
]

# Heavy models (tens of millions of parameters, or 224x224 attention) run under -m slow only.
SLOW_ZOO: list[tuple[str, tuple[int, int, int]]] = [
    ("tv:densenet121", (3, 64, 64)),
    ("tv:resnet50", (3, 64, 64)),
    ("tv:vit_b_16", (3, 224, 224)),
    ("swin_tiny_patch4_window7_224", (3, 224, 224)),
]


def zoo_params() -> list:
    """``ZOO`` and ``SLOW_ZOO`` as pytest params (ids: the specs), the slow ones marked ``slow``."""
    return ([pytest.param(e, id=e[0]) for e in ZOO]
            + [pytest.param(e, id=e[0], marks=pytest.mark.slow) for e in SLOW_ZOO])


# The models named in the ghost issue's bar (each must receive skip edges and ghost neurons
# where it has ReLU-family activations).
# Models whose graph really differs between train and eval (auxiliary heads, eval-time caches):
# fxsparse detects them and guards the traced GraphModule against the other mode.
MODE_DEPENDENT = [("tv:googlenet", (3, 64, 64)), ("levit_128s", (3, 224, 224))]

GHOST_BAR = ["resnet18", "resnet50", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto", "regnetx_002"]
