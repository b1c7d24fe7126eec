"""Is there a hidden trigger? Trigger inversion, maximum margin and symmetry searches, each one compiled program.

    from jaxrisk import scan
    from jaxrisk.search import RunConfig
    result = scan.run(model, images, scan.ScanConfig(run=RunConfig(restarts=4)))
    result.write("runs/scan")
"""

from jaxrisk.scan.config import DecisionConfig, InversionConfig, MarginConfig, ScanConfig
from jaxrisk.scan.margin import MaxMargin, gamma_p_value, max_margins
from jaxrisk.scan.problem import InversionState, TriggerInversion
from jaxrisk.scan.reference import Reference, load_reference
from jaxrisk.scan.report import ScanResult
from jaxrisk.scan.decide import flag_outliers, mad_anomaly_index
from jaxrisk.scan.run import run

__all__ = ["DecisionConfig", "InversionConfig", "InversionState", "MarginConfig", "MaxMargin", "ScanConfig",
           "Reference", "ScanResult", "TriggerInversion", "flag_outliers", "gamma_p_value", "load_reference",
           "mad_anomaly_index", "max_margins", "run"]
