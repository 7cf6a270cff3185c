from twisted.application.service import ServiceMaker

jobletPersist = ServiceMaker(
    "joblet-persist",
    "joblet_persist.tap",
    "Store joblet job output and metrics and answer historical queries over gRPC.",
    "joblet-persist",
)
