"""The OLMo2 baselines of the 700M comparison (Table 3 rows 1-2): the MoDA 700M shape without depth
KV. The argument is the number of layers: 36 (same depth as MoDA) or 38 (parameter-matched, +2).

  --config=configs/baseline_700m.py      --config=configs/baseline_700m.py:38
"""

from configs import moda_700m


def get_config(num_layers: str = "36"):
  c = moda_700m.get_config("none")
  c.model.num_layers = int(num_layers or 36)
  return c
