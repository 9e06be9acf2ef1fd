"""Stand-in for ComfyUI's folder_paths (models_dir is set by the test before registering)."""
import os

models_dir = os.path.join(os.getcwd(), "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def get_folder_paths(key):
    return list(folder_names_and_paths[key][0])


def get_filename_list(key):
    dirs, exts = folder_names_and_paths[key]
    out = []
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                if not exts or os.path.splitext(f)[1] in exts:
                    out.append(os.path.relpath(os.path.join(root, f), d))
    return sorted(set(out))


def get_full_path_or_raise(key, name):
    for d in folder_names_and_paths[key][0]:
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"Model in folder '{key}' with filename '{name}' not found.")
