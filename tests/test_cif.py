import numpy as np
import pytest
from pymatgen.core import Structure

from crystallm_core import cif, spacegroups
from crystallm_core.cif import CifError, canonicalize, parse_structure, read_cif


def test_canonicalize_is_idempotent_on_real_structures(carbon_rows):
    """Re-reading a canonical CIF finds the group it states, also where idealizing raised the symmetry."""
    rows = [r for r in carbon_rows] + [r for r in _rows_with_id("C-172917-5417-5")]
    for row in rows:
        first = canonicalize(Structure.from_str(row["cif"], fmt="cif"))
        second = canonicalize(parse_structure(first.text))
        assert second.spacegroup_number == first.spacegroup_number, row["material_id"]


def _rows_with_id(material_id):
    from tests.conftest import CARBON_VAL, read_rows

    return [r for r in read_rows(CARBON_VAL) if r["material_id"] == material_id]


def test_orbits_have_the_size_of_general_and_special_positions():
    rots, trans = spacegroups.operations(225)
    assert len(cif.orbit(np.array([0.0, 0.0, 0.0]), rots, trans)) == 4
    assert len(cif.orbit(np.array([0.1234, 0.2345, 0.3456]), rots, trans)) == 192
    assert len(cif.orbit(np.array([0.9999, 0.0, 0.0]), rots, trans, tol=1e-3)) == 4


@pytest.mark.parametrize("op", ["x, y, .z", "x+1/0, y, z", "x, y", "x, y, q", "x, y, z+"])
def test_malformed_operators_are_cif_errors(op):
    text = "data_x\nloop_\n_symmetry_equiv_pos_as_xyz\n'" + op + "'\n"
    with pytest.raises(CifError, match="symmetry operator"):
        cif.symmetry_operations(read_cif(text))


def test_reader_errors_name_the_problem():
    cell = "".join(f"{t} 4.0\n" for t in cif.CELL_TAGS[:3]) + "".join(f"{t} 90\n" for t in cif.CELL_TAGS[3:])
    with pytest.raises(CifError, match="lacks _atom_site_fract_y, _atom_site_fract_z"):
        cif.sites(read_cif("data_x\n" + cell + "loop_\n_atom_site_type_symbol\n_atom_site_fract_x\nNa 0\n"))
    with pytest.raises(CifError, match="empty symmetry-operator loop"):
        cif.symmetry_operations(read_cif("data_x\nloop_\n_symmetry_equiv_pos_as_xyz\n_symmetry_equiv_pos_site_id\n"))
    with pytest.raises(CifError, match="no data_ block"):
        read_cif("_cell_length_a 4\n")
    with pytest.raises(CifError, match="missing _cell_length_c"):
        parse_structure("data_x\n_cell_length_a 4\n_cell_length_b 4\n")
