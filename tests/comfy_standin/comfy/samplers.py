class KSampler:
    # A subset of ComfyUI's menus (what the shipped workflows pick); the stand-in's sample() runs only
    # euler / normal and refuses the others.
    SAMPLERS = ["euler", "uni_pc"]
    SCHEDULERS = ["normal", "simple"]
