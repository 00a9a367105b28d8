"""Send every new flow to one backend, named in the options; refuse flows if it is gone.

    policy = "file:policies/pin.py"
    [service.policy_options]
    backend = "backend-2"

The smallest useful policy (the README's example), and the one the end-to-end test runs.
"""

from nfqlb.policies import Backend, FlowKey, Options


class Pin:
    def __init__(self, options, rng):
        self.name = Options(options, {"backend"}).text("backend")
        self.target: Backend | None = None

    def set_backends(self, backends):
        self.target = next((b for b in backends if b.name == self.name and b.weight > 0), None)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        return self.target  # None: the flow is refused (counted no_backend)


factory = Pin
