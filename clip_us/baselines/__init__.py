"""The baseline rows of the ultrasound-CLIP paper's Tables 2 and 3 (Qu et al., "Adapting
Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis"), as its
official code builds them.

- `backbones.py`: MetaCLIP, BiomedCLIP, UniMedCLIP, DINOv2 and ResNet18 towers behind one interface;
- `unet.py`, `clipseg.py`, `dinov2_heads.py`: the rows with heads of their own;
- `rows.py`: those rows' task models.
"""
