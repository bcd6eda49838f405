"""Layers of lvis_longtail that detectron2 0.6 lacks on a PyPI-only install: deformable
convolution through torchvision (:mod:`.deform_conv`, installed by :mod:`lvis_longtail.compat`),
deformable RoI pooling (:mod:`.deform_roi_pool`), CARAFE upsampling (:mod:`.carafe`) and a
SyncBatchNorm that also synchronises CPU processes (:mod:`.sync_bn`)."""
