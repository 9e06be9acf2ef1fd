"""Stand-in for comfy_api.latest: ComfyExtension and the io subset the nodes use."""
from . import _io as io


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self):
        raise NotImplementedError
