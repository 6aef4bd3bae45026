set grid
set key outside right noenhanced
set terminal pngcairo size 1100,900 font 'sans,10'
set output 'docs/results/constant-lr/plots/loss.png'
set multiplot layout 2,1
set xlabel 'training tokens (millions)'
set ylabel 'cross-entropy (nats)'
set title 'Validation loss: mean over seeds, band = min-max'
plot 'docs/results/constant-lr/plots/validation_top2-switch.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 1 notitle, 'docs/results/constant-lr/plots/validation_loss-free.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 2 notitle, 'docs/results/constant-lr/plots/validation_bip.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 3 notitle, 'docs/results/constant-lr/plots/validation_ec-causal.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 4 notitle, 'docs/results/constant-lr/plots/validation_top2-switch.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 1 title 'top2-switch', 'docs/results/constant-lr/plots/validation_loss-free.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 2 title 'loss-free', 'docs/results/constant-lr/plots/validation_bip.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 3 title 'bip', 'docs/results/constant-lr/plots/validation_ec-causal.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 4 title 'ec-causal'
set title 'Training loss: mean over seeds, moving average'
plot 'docs/results/constant-lr/plots/train_top2-switch.dat' using 1:2 with lines lw 2 lc 1 title 'top2-switch', 'docs/results/constant-lr/plots/train_loss-free.dat' using 1:2 with lines lw 2 lc 2 title 'loss-free', 'docs/results/constant-lr/plots/train_bip.dat' using 1:2 with lines lw 2 lc 3 title 'bip', 'docs/results/constant-lr/plots/train_ec-causal.dat' using 1:2 with lines lw 2 lc 4 title 'ec-causal'
unset multiplot
set terminal pngcairo size 1100,550 font 'sans,10'
set output 'docs/results/constant-lr/plots/max_vio_batch.png'
set title 'MaxVio_batch per training step (mean over MoE layers and seeds, moving average); dashed: 0.5' noenhanced
set xlabel 'step'
set ylabel 'MaxVio_batch' noenhanced
set logscale y
plot 'docs/results/constant-lr/plots/max_vio_top2-switch.dat' using 1:2 with lines lw 2 lc 1 title 'top2-switch', 'docs/results/constant-lr/plots/max_vio_loss-free.dat' using 1:2 with lines lw 2 lc 2 title 'loss-free', 'docs/results/constant-lr/plots/max_vio_bip.dat' using 1:2 with lines lw 2 lc 3 title 'bip', 'docs/results/constant-lr/plots/max_vio_ec-causal.dat' using 1:2 with lines lw 2 lc 4 title 'ec-causal', 0.5 with lines dt 2 lc rgb 'black' notitle
unset logscale y
set terminal pngcairo size 840,640 font 'sans,9'
set output 'docs/results/constant-lr/plots/load_heatmaps.png'
set multiplot layout 2,2 title 'Expert load during training (load / mean load, both MoE layers summed; first seed)'
unset key
set xlabel 'training step'
set ylabel 'expert'
set cbrange [0:3]
set palette rgbformulae 21,22,23
set title 'top2-switch' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/constant-lr/plots/load_top2-switch.dat' using 1:2:3 with image
set title 'loss-free' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/constant-lr/plots/load_loss-free.dat' using 1:2:3 with image
set title 'bip' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/constant-lr/plots/load_bip.dat' using 1:2:3 with image
set title 'ec-causal' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/constant-lr/plots/load_ec-causal.dat' using 1:2:3 with image
unset multiplot
unset cbrange
set xrange [*:*]
set yrange [*:*]
set terminal pngcairo size 920,700 font 'sans,9'
set output 'docs/results/constant-lr/plots/genre_expert.png'
set multiplot layout 2,2 title 'p(expert | genre) on the validation set (MoE layers summed; first seed)'
unset key
set xlabel 'expert'
set ylabel ''
set cbrange [0:*]
set palette rgbformulae 21,22,23
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'top2-switch' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/constant-lr/plots/genre_top2-switch.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'loss-free' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/constant-lr/plots/genre_loss-free.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'bip' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/constant-lr/plots/genre_bip.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'ec-causal' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/constant-lr/plots/genre_ec-causal.dat' using 1:2:3 with image
unset multiplot
set ytics autofreq
unset cbrange
set xrange [*:*]
set yrange [*:*]
set terminal pngcairo size 1300,750 font 'sans,10'
set output 'docs/results/constant-lr/plots/bars.png'
set multiplot layout 2,3 title 'mean over seeds, error bars = min-max'
unset key
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.7 border -1
set boxwidth 0.8
set xtics rotate by -30 noenhanced
set xlabel ''
set ylabel ''
set title 'validation perplexity' noenhanced
set yrange [0:100.677]
plot 'docs/results/constant-lr/plots/bar_ppl_validation.dat' using 2:3:4:xtic(1) lc 3
set title 'held-out genre perplexity' noenhanced
set yrange [0:106.198]
plot 'docs/results/constant-lr/plots/bar_ppl_heldout.dat' using 2:3:4:xtic(1) lc 3
set title 'MaxVio_batch (mean over steps)' noenhanced
set yrange [0:1.74351]
plot 'docs/results/constant-lr/plots/bar_max_vio_batch.dat' using 2:3:4:xtic(1) lc 3
set title 'MaxVio_global (validation)' noenhanced
set yrange [0:1.06548]
plot 'docs/results/constant-lr/plots/bar_max_vio_global.dat' using 2:3:4:xtic(1) lc 3
set title 'specialisation I(genre; expert)/H(genre)' noenhanced
set yrange [0:0.013144]
plot 'docs/results/constant-lr/plots/bar_specialization.dat' using 2:3:4:xtic(1) lc 3
set title 'optimality gap vs exact balanced optimum' noenhanced
set yrange [-0.140355:0.0127595]
plot 'docs/results/constant-lr/plots/bar_gap.dat' using 2:3:4:xtic(1) lc 3
unset multiplot
set yrange [*:*]
