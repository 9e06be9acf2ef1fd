from . import supported_models


def model_config_from_unet_config(unet_config, state_dict=None):
    for cls in supported_models.models:
        if cls.matches(unet_config):
            return cls(unet_config)
    return None
