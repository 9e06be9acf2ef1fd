"""Stand-in for comfy.utils.ProgressBar; instances are recorded so tests can read progress."""
BARS = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0
        BARS.append(self)

    def update(self, value):
        self.current += value

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = value
