"""Angular super-resolution: predict the DWI signal at unseen q-space directions before model fitting.

Spatio-angular parametric continuous convolution networks (PCCNN, Lyon et al., NeurIPS 2023) in
PyTorch (the ``learn`` extra; importing this package does not import PyTorch):

* :mod:`.nets`: the network, in the parameter layout of the published ``dmri-pcconv`` weights;
* :mod:`.modelfile`: loading published weights, Lightning checkpoints and tractoscale's own files;
* :mod:`.predict`: per-shell scaling, patches, prediction of new directions;
* :mod:`.train` and :mod:`.cli`: ``tractoscale train-angular-sr``;
* :mod:`.app`: the participant stage (``--angular-sr``) and its checks before any work;
* :mod:`.evaluate`: CSD peak errors in the demo phantom's crossing voxels (tests, README figures).
"""
