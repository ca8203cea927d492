"""The HTTP routes, one APIRouter per group; `service.app.create_app` includes them.

Every route reads the service's parts (settings, queue, models, worker, metrics) from the
`ServiceState` on ``app.state.service`` through the dependencies in `service.routes.deps`.
"""
