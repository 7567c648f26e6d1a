"""Hand-built plans for tests that must not depend on the scheduler."""

from skippipe.plan import MicrobatchRoute, Plan


def make_plan(allocation, stage_paths, originators=None, method="handmade"):
    """One microbatch per entry of ``stage_paths`` (stages after 0); replicas chosen round robin."""
    mbs = []
    for i, stages in enumerate(stage_paths):
        origin = (originators or allocation[0])[i % len(originators or allocation[0])]
        path = [allocation[s][i % len(allocation[s])] for s in stages]
        mbs.append(MicrobatchRoute(i, origin, path))
    visited = len(stage_paths[0]) + 1
    return Plan(method, len(allocation), visited, allocation, mbs)
