"""The `mizzen` command, modelled on kubectl and istioctl."""
